// Dispatch + threading for the LoRA skinny products; also their scalar build.
#define PYENGINE_ISA_NS scalar
#include "lora_impl.h"

#include "cpu_features.h"
#include "parallel.h"

#include <algorithm>

namespace pyengine {

template <typename Args>
using RangeFn = void (*)(const Args&, int64_t, int64_t);

template <typename Args>
static RangeFn<Args> pick(RangeFn<Args> s, RangeFn<Args> a2, RangeFn<Args> a512) {
  switch (active_isa()) {
    case Isa::kAvx512: return a512;
    case Isa::kAvx2: return a2;
    default: return s;
  }
}

void lora_down_up_add(const LoraDownArgs& d, const LoraUpAddArgs& up, int num_threads) {
  auto down = pick<LoraDownArgs>(scalar::lora_down_rows, avx2::lora_down_rows,
                                 avx512::lora_down_rows);
  auto up_add = pick<LoraUpAddArgs>(scalar::lora_up_add_rows, avx2::lora_up_add_rows,
                                    avx512::lora_up_add_rows);
  parallel_for(d.n, num_threads, 16, [&](int64_t b, int64_t e) {
    down(d, b, e);
    if (up.out) up_add(up, b, e);  // reads only the rows of u this thread just wrote
  });
}

// Threads split the columns of g in blocks of 64 (each owns its slice: no reduction
// across threads); columns of `a` come first, then those of `b` (b.n == 0: none).
void lora_outer2(const LoraOuterArgs& a, const LoraOuterArgs& b, int num_threads) {
  auto fn = pick<LoraOuterArgs>(scalar::lora_outer_cols, avx2::lora_outer_cols,
                                avx512::lora_outer_cols);
  const int64_t blocks_a = (a.k + 63) / 64, blocks_b = b.n ? (b.k + 63) / 64 : 0;
  auto run = [&](const LoraOuterArgs& o, int64_t first, int64_t last) {  // block range
    if (first < last) fn(o, first * 64, std::min(last * 64, o.k));
  };
  parallel_for(blocks_a + blocks_b, num_threads, 1, [&](int64_t s, int64_t e) {
    run(a, s, std::min(e, blocks_a));
    run(b, std::max(s, blocks_a) - blocks_a, e - blocks_a);
  });
}

}  // namespace pyengine
