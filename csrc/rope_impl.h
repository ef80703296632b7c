// Row loops of rope.h, written once and compiled per ISA (see swiglu_impl.h).
#include "common.h"
#include "lowrank_tiles.h"
#include "rope.h"

namespace pyengine {
namespace PYENGINE_ISA_NS {
namespace {

template <typename D, bool kBackward>
void rotate(const RopeArgs& a, int64_t begin, int64_t end) {
  using T = typename D::T;
  const int64_t S = a.seq, half = a.dim / 2, rows_q = a.batch * a.q.heads * S;
  const T* cos = static_cast<const T*>(a.cos);
  const T* sin = static_cast<const T*>(a.sin);
  for (int64_t r = begin; r < end; ++r) {
    const bool is_q = r < rows_q;
    const RopeTensor& t = is_q ? a.q : a.k;
    const int64_t i = is_q ? r : r - rows_q;
    const int64_t b = i / (t.heads * S), h = (i / S) % t.heads, p = i % S;
    const int64_t coff = b * a.cos_sb + p * a.dim;
    const T* x = static_cast<const T*>(t.in) + b * t.sb + h * t.sh + p * t.ss;
    T* y = static_cast<T*>(t.out) + b * t.osb + h * t.osh + p * t.oss;
    const T* c = cos + coff;
    const T* s = sin + coff;
#pragma omp simd
    for (int64_t j = 0; j < half; ++j) {
      const float x1 = D::load(x, j), x2 = D::load(x, j + half);
      const float c1 = D::load(c, j), c2 = D::load(c, j + half);
      const float s1 = D::load(s, j), s2 = D::load(s, j + half);
      if (kBackward) {
        D::store(y, j, x1 * c1 + x2 * s2);
        D::store(y, j + half, x2 * c2 - x1 * s1);
      } else {
        D::store(y, j, x1 * c1 - x2 * s1);
        D::store(y, j + half, x2 * c2 + x1 * s2);
      }
    }
  }
}

template <bool kBackward>
void dispatch(const RopeArgs& a, int64_t begin, int64_t end) {
  switch (a.dtype) {
    case kF32: rotate<F32, kBackward>(a, begin, end); break;
    case kBF16: rotate<BF16, kBackward>(a, begin, end); break;
    default: rotate<F16, kBackward>(a, begin, end); break;
  }
}

}  // namespace

void rope_forward_range(const RopeArgs& a, int64_t begin, int64_t end) {
  dispatch<false>(a, begin, end);
}
void rope_backward_range(const RopeArgs& a, int64_t begin, int64_t end) {
  dispatch<true>(a, begin, end);
}

}  // namespace PYENGINE_ISA_NS
}  // namespace pyengine
