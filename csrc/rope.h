// Rotary position embedding (HF's rotate_half convention) applied to q and k in one pass.
//
//   x = [x1, x2] (halves of head_dim D),  c = cos, s = sin (per batch and position, [D])
//   forward:  y1 = x1 * c1 - x2 * s1,   y2 = x2 * c2 + x1 * s2
//             (= x * cos + rotate_half(x) * sin, rotate_half(x) = [-x2, x1])
//   backward: dx1 = dy1 * c1 + dy2 * s2,   dx2 = dy2 * c2 - dy1 * s1
//             (the transpose; a rotation by -sin when the halves of cos/sin are equal)
// q [B, Hq, S, D], k [B, Hk, S, D] with any strides for B, H, S (D contiguous), and so
// the outputs.  cos, sin [Bc, S, D] contiguous, Bc = B or 1.  One
// dtype (fp32, bf16, fp16) for all; math in fp32, one rounding per output element.
// Floor (bytes): reads q, k, cos, sin and writes q, k once: memory-bound (3 flops/element).
#pragma once
#include <cstdint>

namespace pyengine {

struct RopeTensor {
  const void* in;        // x (forward) or dy (backward)
  void* out;             // y or dx
  int64_t heads;
  int64_t sb, sh, ss;    // element strides of batch, head, position in `in`
  int64_t osb, osh, oss; // the same in `out`
};

struct RopeArgs {
  int dtype;
  int64_t batch, seq, dim;
  int64_t cos_sb;        // cos/sin batch stride (0 when broadcast)
  const void* cos;
  const void* sin;
  RopeTensor q, k;
};

void rope_forward(const RopeArgs& a, int num_threads);
void rope_backward(const RopeArgs& a, int num_threads);

// Row-range kernels over the rows (b, h, s) of q followed by those of k.
#define PYENGINE_ROPE_DECL                                                       \
  void rope_forward_range(const RopeArgs& a, int64_t begin, int64_t end);        \
  void rope_backward_range(const RopeArgs& a, int64_t begin, int64_t end);
namespace scalar { PYENGINE_ROPE_DECL }
namespace avx2 { PYENGINE_ROPE_DECL }
namespace avx512 { PYENGINE_ROPE_DECL }
#undef PYENGINE_ROPE_DECL

}  // namespace pyengine
