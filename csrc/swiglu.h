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

void swiglu_forward(const SwigluArgs& a, int num_threads);
void swiglu_backward(const SwigluArgs& a, int num_threads);

#define PYENGINE_SWIGLU_DECL                                                     \
  void swiglu_forward_range(const SwigluArgs& a, int64_t begin, int64_t end);  \
  void swiglu_backward_range(const SwigluArgs& a, int64_t begin, int64_t end);
namespace scalar { PYENGINE_SWIGLU_DECL }
namespace avx2 { PYENGINE_SWIGLU_DECL }
namespace avx512 { PYENGINE_SWIGLU_DECL }
#undef PYENGINE_SWIGLU_DECL

}  // namespace pyengine
