// SwiGLU: the gated activation of Llama-family MLPs, forward and backward in one pass each.
//
//   forward:  h = silu(g) * u,           silu(g) = g * sigmoid(g)
//   backward: s = sigmoid(g)  (recomputed from g, never stored)
//             du = dh * g * s
//             dg = dh * u * s * (1 + g * (1 - s))
//             h  = g * s * u  (optional: the activation recomputed for callers that need it,
//                              e.g. the LoRA-on-down weight gradient in lora_mlp)
// g, u, h, dh, dg, du: n elements each, contiguous, all of one dtype (fp32, bf16 or fp16);
// all math in fp32.  Floor (bytes): forward reads 2n and writes n elements, backward reads
// 3n and writes 2n (3n with h); ~10 flops + one exp per element, so memory-bound.
//
// LoRA variants (the middle of pyengine.ops.lora_mlp, rows of [N, I] matrices): the
// skinny low-rank products around the activation are fused into the same pass, so no
// [N, I] temporary or dtype conversion is made for them.  All low-rank operands are fp32;
// the products run on the low-rank engine's micro-kernels (lowrank_tiles.h) over fp32
// chunks of a row block held in a stack scratch.
//   forward:  g += xa_g @ Bg.T,  u += xa_u @ Bu.T   (in place: g, u become the
//             pre-activations kept for backward),  h = silu(g) * u,  ha = scale * h @ Ad.T
//   backward: dh += p_down @ Ad  (p_down = scale * dy @ Bd), then dg, du as above with
//             dg written over dh; h recomputed in registers only, and
//             d_a_down += p_down.T @ h,  d_bg_t += xa_g.T @ dg,  d_bu_t += xa_u.T @ du,
//             p_gu = scale * [dg @ Bg, du @ Bu]
// Extra flops: 2r per element forward (r = rg + ru + rd), 2 (rd + 2 rg + 2 ru) backward.
#pragma once
#include <cstdint>

namespace pyengine {

struct SwigluArgs {
  int dtype;        // DType of every tensor
  int64_t n;        // elements
  const void* g;    // gate pre-activation
  const void* u;    // up projection
  const void* dh;   // backward only: gradient of h
  void* h;          // forward: output; backward: optional recomputed activation (nullptr: skip)
  void* dg;         // backward only
  void* du;         // backward only
};

struct LoraSwigluArgs {
  int dtype;                 // DType of g, u, h, dh, du
  int64_t n_rows, inter;     // N, I
  int64_t rg, ru, rd;        // ranks of gate, up, down
  float scale;
  void* g;                   // [N, I] forward: in/out; backward: in
  void* u;                   // [N, I] forward: in/out; backward: in
  void* h;                   // [N, I] forward out
  void* dh;                  // [N, I] backward: in dy @ Wd, out dg
  void* du;                  // [N, I] backward out
  const float* xa;           // [N, rg + ru] scale * x @ [Ag; Au].T
  const float* bg_t;         // [rg, I] Bg transposed
  const float* bu_t;         // [ru, I] Bu transposed
  const float* a_down;       // [rd, I]
  float* ha;                 // [N, rd] forward out
  const float* p_down;       // [N, rd] backward in
  float* p_gu;               // [N, rg + ru] backward out
  float* d_a_down;           // [rd, I] backward, accumulated (caller zeroes)
  float* d_bg_t;             // [rg, I] backward, accumulated
  float* d_bu_t;             // [ru, I] backward, accumulated
};

void swiglu_forward(const SwigluArgs& a, int num_threads);
void swiglu_backward(const SwigluArgs& a, int num_threads);
void lora_swiglu_forward(const LoraSwigluArgs& a, int num_threads);
void lora_swiglu_backward(const LoraSwigluArgs& a, int num_threads);

// Row-range kernels; the backward one accumulates its weight gradients into `acc`
// ([(rd + rg + ru) * I] fp32, zeroed, one per row block).
#define PYENGINE_SWIGLU_DECL                                                              \
  void swiglu_forward_range(const SwigluArgs& a, int64_t begin, int64_t end);           \
  void swiglu_backward_range(const SwigluArgs& a, int64_t begin, int64_t end);          \
  void lora_swiglu_forward_range(const LoraSwigluArgs& a, int64_t begin, int64_t end);  \
  void lora_swiglu_backward_range(const LoraSwigluArgs& a, int64_t begin, int64_t end,  \
                                  float* acc);
namespace scalar { PYENGINE_SWIGLU_DECL }
namespace avx2 { PYENGINE_SWIGLU_DECL }
namespace avx512 { PYENGINE_SWIGLU_DECL }
#undef PYENGINE_SWIGLU_DECL

}  // namespace pyengine
