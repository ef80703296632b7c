// LoRA skinny products: the C++ half of pyengine.ops.lora_linear (cpu backend).
//
// The big GEMMs (x @ W.T, dy @ W) stay with torch; these are the rank-r products around
// them, each fused with its scale-and-add so that y / dx are read and written once:
//   down:    u[N, r]  = keep * (x[N, K] * mask) @ w[r, K].T        (u = x@A.T, v = dy@B)
//   up_add:  out[N, M] += alpha * (u[N, r] @ w[r, M]) * mask       (y += s*u@B.T, dx += ...)
//   outer:   g[r, K]  = alpha * u[N, r].T @ (x[N, K] * mask)       (dA, dB.T)
// x / out are fp32 or bf16 (dtype code, rows contiguous), u / w / g fp32, mask optional
// uint8 [N, K] (dropout keep-mask); all math in fp32.  r is small (1..64 typical).
// Floor: memory-bound; down and outer read x once (2*N*K*r flops), up_add reads and
// writes out once (2*N*M*r flops); w / u stay in cache.
#pragma once
#include <cstdint>

namespace pyengine {

struct LoraDownArgs {
  const void* x; int dtype; int64_t n, k;
  const float* w; int64_t r;
  const uint8_t* mask; float keep;
  float* u;
};

struct LoraUpAddArgs {
  void* out; int dtype; int64_t n, m;
  const float* u; const float* w; int64_t r;
  float alpha; const uint8_t* mask;
};

struct LoraOuterArgs {
  const void* x; int dtype; int64_t n, k;
  const float* u; int64_t r;
  const uint8_t* mask; float alpha;
  float* g;
};

// Both entry points run one parallel region (fewer thread hand-offs, rows stay in cache):
// down then up_add on the same rows (u = x@A.T then y += s*u@B.T; v = dy@B then
// dx += s*v@A; up.out == nullptr: down only), and two outers split over their columns
// together (dA and dB.T; b.n == 0: only a).
void lora_down_up_add(const LoraDownArgs& d, const LoraUpAddArgs& up, int num_threads);
void lora_outer2(const LoraOuterArgs& a, const LoraOuterArgs& b, int num_threads);

#define PYENGINE_LORA_DECLS                                                           \
  void lora_down_rows(const LoraDownArgs& a, int64_t begin, int64_t end);            \
  void lora_up_add_rows(const LoraUpAddArgs& a, int64_t begin, int64_t end);         \
  void lora_outer_cols(const LoraOuterArgs& a, int64_t begin, int64_t end);
namespace scalar { PYENGINE_LORA_DECLS }
namespace avx2 { PYENGINE_LORA_DECLS }
namespace avx512 { PYENGINE_LORA_DECLS }
#undef PYENGINE_LORA_DECLS

}  // namespace pyengine
