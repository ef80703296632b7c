// Stand-in for lora_gather.h (scalar, one row at a time; to be replaced at merge).
#include "lora_gather.h"

#include <vector>

#include "parallel.h"

namespace pyengine {

void lora_gather_add(const float* x, int64_t rows, int64_t k, const int64_t* idx,
                     const float* a, const float* b, int64_t n_adapters, int64_t rank,
                     int64_t n, float* y, int num_threads) {
  if (rank == 0 || n_adapters == 0) return;
  parallel_for(rows, num_threads, 4, [&](int64_t begin, int64_t end) {
    std::vector<float> t(static_cast<size_t>(rank));
    for (int64_t r = begin; r < end; ++r) {
      if (idx[r] < 0) continue;
      const float* ar = a + idx[r] * rank * k;
      const float* br = b + idx[r] * n * rank;
      for (int64_t j = 0; j < rank; ++j) {
        float s = 0.f;
        for (int64_t i = 0; i < k; ++i) s += ar[j * k + i] * x[r * k + i];
        t[size_t(j)] = s;
      }
      for (int64_t o = 0; o < n; ++o) {
        float s = 0.f;
        for (int64_t j = 0; j < rank; ++j) s += br[o * rank + j] * t[size_t(j)];
        y[r * n + o] += s;
      }
    }
  });
}

}  // namespace pyengine
