// Per-row LoRA delta for many adapters at once (issue 12's adapter bank, not merged):
//
//   y[r, :] += b[idx[r]] @ (a[idx[r]] @ x[r, :])   for every row r with idx[r] >= 0
//
// STAND-IN (branch cbatch): a plain scalar implementation with the shared signature, to be
// replaced at merge by helper `loragather`'s kernel.
#pragma once
#include <cstdint>

namespace pyengine {

// y[r, :] += b[idx[r]] @ (a[idx[r]] @ x[r, :]) for every row r with idx[r] >= 0.
// x [rows, k] fp32, idx [rows] int64, a [n_adapters, rank, k] fp32, b [n_adapters, n, rank]
// fp32, y [rows, n] fp32. Each adapter's a and b are read once per call (rows grouped by
// adapter); every y element is computed by one thread in a fixed order (same bits on
// any thread count). rank == 0 or n_adapters == 0: no-op.
void lora_gather_add(const float* x, int64_t rows, int64_t k, const int64_t* idx,
                     const float* a, const float* b, int64_t n_adapters, int64_t rank,
                     int64_t n, float* y, int num_threads);

}  // namespace pyengine
