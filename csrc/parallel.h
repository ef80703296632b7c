// A persistent worker pool for the kernels.  Callers pass the thread count torch uses
// (torch.get_num_threads()), so we never oversubscribe when called from torch; the pool
// never uses OpenMP (torch bundles its own runtime; two runtimes would fight).
#pragma once
#include <cstdint>
#include <functional>

namespace pyengine {

// Split [0, n) into `num_threads` contiguous ranges (fewer when n is small, never below
// `grain` items each) and run fn(begin, end) on them; the caller runs the first range.
void parallel_for(int64_t n, int num_threads, int64_t grain,
                  const std::function<void(int64_t, int64_t)>& fn);

}  // namespace pyengine
