// Batched gather-LoRA ("BGMV", as in S-LoRA / Punica): every row of a batch carries its own
// adapter index into a stack of adapters, and gets that adapter's low-rank delta added:
//
//   y[r, :] += b[idx[r]] @ (a[idx[r]] @ x[r, :])      for rows with idx[r] >= 0 (-1: base only)
//
// x [rows, k], y [rows, n], a [n_adapters, rank, k], b [n_adapters, n, rank]: fp32, contiguous;
// idx [rows] int64.  Fused: the gather of each row's adapter, both skinny products and the add
// into y; no [rows, rank, k] gathered copy of the adapters is made.
// Rows are grouped by adapter (counting sort), so each used adapter's a and b are read once
// per call.  A side: t = X_g @ a_g^T ([rows_g, rank] fp32 scratch), threads split (adapter,
// rank chunk), on the low-rank engine's proj micro-kernel (lowrank_tiles.h) over gathered
// row pointers; B side: threads split n, y[r, n'] += sum_j b_g[n', j] t[r, j], in blocks of
// 16 (AVX-512) / 8 (AVX2) columns whose dot products are summed by one lane-symmetric tree
// (the scalar build: proj, one horizontal sum per output).
// Every t and y element is computed by one thread in an order fixed by the code: the same
// bits on any thread count (ISAs may differ in the last bits).
// Floor (bytes): each used adapter's a and b once + x + y read and written:
// 4 (n_used rank (k + n) + rows k + 2 rows n); FLOPs 2 rows_used rank (k + n).
#pragma once
#include <cstdint>

namespace pyengine {

// y[r, :] += b[idx[r]] @ (a[idx[r]] @ x[r, :]) for every row r with idx[r] >= 0.
// x [rows, k] fp32, idx [rows] int64, a [n_adapters, rank, k] fp32, b [n_adapters, n, rank]
// fp32, y [rows, n] fp32. Each adapter's a and b are read once per call (rows grouped by
// adapter); every y element is computed by one thread in a fixed order (same bits on
// any thread count). rank == 0 or n_adapters == 0: no-op.  An index outside
// [-1, n_adapters) throws std::invalid_argument before anything is written.
void lora_gather_add(const float* x, int64_t rows, int64_t k, const int64_t* idx,
                     const float* a, const float* b, int64_t n_adapters, int64_t rank,
                     int64_t n, float* y, int num_threads);

// The rows of one adapter: positions [begin, begin + count) of LoraGatherPlan::order.
struct LoraGroup {
  int64_t adapter, begin, count;
};

// One call, rows grouped: the ISA kernels' view.
struct LoraGatherPlan {
  const float* x;
  int64_t k;
  const float* a;
  const float* b;
  int64_t rank, n;
  float* y;
  const int64_t* order;     // row numbers grouped by adapter (rows with idx -1 left out)
  const LoraGroup* groups;  // the used adapters, ascending
  int64_t n_groups;
  float* t;                 // [len(order), rank] scratch: row order[p] of X @ a^T at row p
};

// Rank chunk of one A-side task: tasks = n_groups * ceil(rank / kLoraRankChunk).
constexpr int64_t kLoraRankChunk = 8;

// A side: tasks [begin, end) write their t entries; B side: columns [begin, end) of y.
#define PYENGINE_LORA_GATHER_DECL                                                \
  void lora_gather_a_range(const LoraGatherPlan& p, int64_t begin, int64_t end); \
  void lora_gather_b_range(const LoraGatherPlan& p, int64_t begin, int64_t end);
namespace scalar { PYENGINE_LORA_GATHER_DECL }
namespace avx2 { PYENGINE_LORA_GATHER_DECL }
namespace avx512 { PYENGINE_LORA_GATHER_DECL }
#undef PYENGINE_LORA_GATHER_DECL

}  // namespace pyengine
