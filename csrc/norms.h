// Row normalisations with the residual add fused in, forward and backward in one pass each
// way over a row (the row is kept in an fp32 buffer between its passes, so x, residual and
// dy are each read once).  Rows of `cols` contiguous elements; one dtype for x, residual,
// weight, bias, y, s, dy, dx (fp32, bf16 or fp16); statistics and math in fp32.
//
// RMSNorm (HF LlamaRMSNorm semantics):
//   s = x + residual                   (written only when a residual is given)
//   rstd = 1 / sqrt(mean(s^2) + eps)   (fp32, saved per row)
//   n = round_dtype(s * rstd),  y = round_dtype(weight * n)   (two roundings, as HF)
//   backward: dn = dy * weight,  dx = rstd * (dn - s*rstd * mean(dn * s*rstd)) + ds,
//             dweight += dy * n    (fp32, rows reduced in a fixed block order)
// LayerNorm (torch.nn.LayerNorm semantics):
//   s = x + residual,  mean, rstd = 1 / sqrt(var(s) + eps)   (fp32, saved per row)
//   y = round_dtype((s - mean) * rstd * weight + bias)
//   backward: xh = (s - mean) * rstd,  g = dy * weight,
//             dx = rstd * (g - mean(g) - xh * mean(g * xh)) + ds,
//             dweight += dy * xh,  dbias += dy   (fp32, fixed block order)
// ds: gradient of the returned s (nullptr: none); dx is then also the residual's gradient.
// Floor (bytes): RMSNorm forward reads 2 and writes 2 rows per row (1 and 1 without
// residual), backward reads s and dy (+ ds) and writes dx; LayerNorm the same.  ~10 flops
// per element: memory-bound.
#pragma once
#include <cstdint>

namespace pyengine {

struct NormArgs {
  int dtype;              // DType of every tensor but the fp32 statistics and gradients
  int64_t rows, cols;
  float eps;
  const void* x;          // forward in [rows, cols]
  const void* residual;   // forward in, nullptr: none
  const void* weight;     // [cols]
  const void* bias;       // [cols], LayerNorm only
  void* y;                // forward out
  void* s;                // forward out (x + residual; only with a residual); backward in
  float* mean;            // [rows] LayerNorm: forward out, backward in
  float* rstd;            // [rows] forward out, backward in
  const void* dy;         // backward in
  const void* ds;         // backward in, nullptr: none
  void* dx;               // backward out
  float* dweight;         // [cols] backward out (caller zeroes); nullptr: not wanted
  float* dbias;           // [cols] backward out, LayerNorm (caller zeroes); nullptr: idem
};

void rms_norm_forward(const NormArgs& a, int num_threads);
void rms_norm_backward(const NormArgs& a, int num_threads);
void layer_norm_forward(const NormArgs& a, int num_threads);
void layer_norm_backward(const NormArgs& a, int num_threads);

// Row-range kernels; the backward ones add their weight gradients into `acc`
// ([cols] dweight then [cols] dbias for LayerNorm, fp32, zeroed, one per row block;
// nullptr: dx only).
#define PYENGINE_NORMS_DECL                                                                \
  void rms_norm_forward_range(const NormArgs& a, int64_t begin, int64_t end);             \
  void rms_norm_backward_range(const NormArgs& a, int64_t begin, int64_t end, float* acc); \
  void layer_norm_forward_range(const NormArgs& a, int64_t begin, int64_t end);           \
  void layer_norm_backward_range(const NormArgs& a, int64_t begin, int64_t end, float* acc);
namespace scalar { PYENGINE_NORMS_DECL }
namespace avx2 { PYENGINE_NORMS_DECL }
namespace avx512 { PYENGINE_NORMS_DECL }
#undef PYENGINE_NORMS_DECL

}  // namespace pyengine
