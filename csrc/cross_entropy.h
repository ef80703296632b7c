// Cross-entropy rows: the C++ half of pyengine.ops.fused_linear_cross_entropy.
//
// Fused: one pass per logits row computes max, logsumexp, the loss (label smoothing,
// z-loss, tanh softcap) and, optionally, d loss / d logits written in place over the row
// (our own chunk buffer, never a caller's tensor).  torch does the three GEMMs around it.
//
// Per row i with target t (z = softcap(l) = c*tanh(l/c), or z = l), eps = label_smoothing:
//   lse  = log sum_j exp(z_j)
//   loss = (1-eps)(lse - z_t) + eps(lse - mean_j z_j) + z_loss * lse^2
//   grad_j = s_i [ p_j (1 + 2 z_loss lse) - eps/V - (1-eps)[j==t] ] * (1 - (z_j/c)^2)
// with p = softmax(z), s_i = scale * row_scale[i] (row_scale optional).  Ignored rows:
// loss 0, lse 0, grad 0.  Logits are fp32, bf16 or fp16 (math in fp32) or fp64 (math in
// fp64, for gradcheck), with row stride ld.  Floor: the row pass reads and writes N*V elements once (bytes), ~5 flops each
// plus one exp; it is small next to the 2*N*V*H-flop GEMMs it sits between.
#pragma once
#include <cstdint>

namespace pyengine {

struct CeArgs {
  void* logits;           // [n_rows, ld] of dtype, first V columns used; grad written here
  int dtype;              // DType
  int64_t n_rows, vocab, ld;
  const int64_t* target;  // [n_rows]
  int64_t ignore_index;
  float label_smoothing, z_loss, softcap;  // softcap <= 0: off
  float scale;                   // multiplies every gradient row
  const float* row_scale;        // optional [n_rows] per-row gradient scale
  void* loss;                    // [n_rows] per-row loss (0 for ignored rows); fp64 for
  void* lse;                     // fp64 logits, else fp32.  lse: optional [n_rows]
  bool write_grad;
};

void ce_rows(const CeArgs& a, int num_threads);

// acc[i] += src[i] for a bf16/fp16/fp32 src: grad_W partial products (low-precision GEMM
// outputs) accumulated across token chunks in fp32.  torch's mixed-dtype in-place add
// takes a slow path here; this is one streaming pass.
void accumulate_f32(float* acc, const void* src, int src_dtype, int64_t n, int num_threads);

// Gradient filter of fused_linear_cross_entropy (filter_eps): of a gradient block
// [rows, vocab] (row stride ld, fp32/bf16/fp16/fp64), the columns j where some row has
// |g_ij| > thr or j is the target of a row that is not ignore_index, written in increasing
// order to cols [vocab]; returns how many.  One read of the block; any thread count gives
// the same columns (an OR per column).
int64_t ce_keep_columns(const void* grad, int dtype, int64_t rows, int64_t vocab, int64_t ld,
                        const int64_t* target, int64_t ignore_index, double thr, int64_t* cols,
                        int num_threads);

// acc[idx[r] * n + c] += src[r * n + c] for r < k, c < n: the filtered grad_W rows added
// into the fp32 accumulator (idx unique, so rows never collide).  src fp32/bf16/fp16.
void accumulate_rows_f32(float* acc, const int64_t* idx, const void* src, int src_dtype,
                         int64_t k, int64_t n, int num_threads);

#define PYENGINE_CE_VARIANT(isa)                                                 \
  namespace isa {                                                                \
  void ce_rows_range(const CeArgs& a, int64_t begin, int64_t end);               \
  void accumulate_range(float* acc, const void* src, int dtype, int64_t b, int64_t e); \
  void keep_range(const void* grad, int dtype, int64_t rows, int64_t ld, double thr,     \
                  int64_t j0, int64_t j1, uint8_t* keep);                         \
  }
PYENGINE_CE_VARIANT(scalar)
PYENGINE_CE_VARIANT(avx2)
PYENGINE_CE_VARIANT(avx512)
#undef PYENGINE_CE_VARIANT

}  // namespace pyengine
