// Grouping + threading of the batched gather-LoRA; also its scalar build.
#define PYENGINE_ISA_NS scalar
#include "lora_gather_impl.h"

#include <stdexcept>
#include <string>
#include <vector>

#include "cpu_features.h"
#include "parallel.h"

namespace pyengine {

void lora_gather_add(const float* x, int64_t rows, int64_t k, const int64_t* idx,
                     const float* a, const float* b, int64_t n_adapters, int64_t rank,
                     int64_t n, float* y, int num_threads) {
  if (rank <= 0 || n_adapters <= 0 || rows <= 0 || n <= 0 || k <= 0) return;
  // counting sort of the rows by adapter; scratch kept per calling thread across calls
  thread_local std::vector<int64_t> count, order;
  thread_local std::vector<LoraGroup> groups;
  thread_local std::vector<float> t;
  count.assign(size_t(n_adapters) + 1, 0);
  for (int64_t r = 0; r < rows; ++r) {
    if (idx[r] < -1 || idx[r] >= n_adapters)
      throw std::invalid_argument("lora_gather_add: idx[" + std::to_string(r) + "] = " +
                                  std::to_string(idx[r]) + " is outside [-1, " +
                                  std::to_string(n_adapters) + ")");
    ++count[size_t(idx[r] + 1)];  // slot 0: the base-only rows, left out below
  }
  groups.clear();
  int64_t used = 0;
  for (int64_t ad = 0; ad < n_adapters; ++ad) {
    const int64_t c = count[size_t(ad + 1)];
    count[size_t(ad + 1)] = used;  // now: the next free position of this adapter
    if (c) groups.push_back({ad, used, c});
    used += c;
  }
  if (!used) return;
  order.resize(size_t(used));
  for (int64_t r = 0; r < rows; ++r)
    if (idx[r] >= 0) order[size_t(count[size_t(idx[r] + 1)]++)] = r;
  if (t.size() < size_t(used * rank)) t.resize(size_t(used * rank));
  const LoraGatherPlan plan{x, k, a, b, rank, n, y, order.data(), groups.data(),
                            int64_t(groups.size()), t.data()};
  const int64_t n_groups = plan.n_groups;
  auto fa = pick_isa(scalar::lora_gather_a_range, avx2::lora_gather_a_range,
                     avx512::lora_gather_a_range);
  auto fb = pick_isa(scalar::lora_gather_b_range, avx2::lora_gather_b_range,
                     avx512::lora_gather_b_range);
  // grains: ~64 KB of adapter weights per thread, below that a hand-off costs more
  const int64_t chunks = (rank + kLoraRankChunk - 1) / kLoraRankChunk;
  parallel_for(n_groups * chunks, num_threads, 1 + 16384 / (kLoraRankChunk * k),
               [&](int64_t b0, int64_t e0) { fa(plan, b0, e0); });
  parallel_for(n, num_threads, 1 + 16384 / (rank * n_groups),
               [&](int64_t b0, int64_t e0) { fb(plan, b0, e0); });
}

}  // namespace pyengine
