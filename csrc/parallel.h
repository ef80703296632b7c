// A persistent worker pool for the kernels.  Callers pass the thread count torch uses
// (torch.get_num_threads()), so we never oversubscribe when called from torch; the pool
// never uses OpenMP (torch bundles its own runtime; two runtimes would fight).
#pragma once
#include <cstdint>
#include <functional>
#include <vector>

namespace pyengine {

// Split [0, n) into `num_threads` contiguous ranges (fewer when n is small, never below
// `grain` items each) and run fn(begin, end) on them; the caller runs the first range.
// For work whose items are independent (each output written by one item) only.
void parallel_for(int64_t n, int num_threads, int64_t grain,
                  const std::function<void(int64_t, int64_t)>& fn);

// An fp32 output that row blocks add into: `size` floats at `data` (caller zeroes).
struct SumOut {
  float* data;
  int64_t size;
};

// Deterministic row reduction: [0, n) is cut into blocks whose bounds depend only on n,
// `grain` and the outputs' size (never on num_threads); fn(begin, end, partial) adds a
// block's contribution into its own zeroed partial (the outputs' sizes, concatenated), and
// the partials are then added into the outputs in block order.  So the result is
// bit-identical for any thread count and any scheduling.  Blocks: at most kMaxRowBlocks,
// fewer when their partials would pass kPartialBudgetBytes, never fewer than kMinRowBlocks
// (so up to 4 threads always share the work).  E.g. lora_mlp backward at I=14336, r=64 on
// all three projections: 11 MB a partial, 5 blocks.
constexpr int64_t kMaxRowBlocks = 16, kMinRowBlocks = 4;
constexpr int64_t kPartialBudgetBytes = int64_t(64) << 20;
void parallel_sum_rows(int64_t n, int num_threads, int64_t grain, const std::vector<SumOut>& outs,
                       const std::function<void(int64_t, int64_t, float*)>& fn);

}  // namespace pyengine
