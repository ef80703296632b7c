// Row driver of lowrank_rows.h, written once and compiled per ISA (PYENGINE_ISA_NS and the
// flags come from the including TU): rows in blocks of kRowBlock; per block proj over its
// src rows, grad into the block's partial, then the add over its dst rows (chained: onto
// the proj just made).  The block's src rows are read from memory once and stay in L1/L2
// between proj and grad.  The micro-kernels are lowrank_tiles.h's.
#include <algorithm>

#include "lowrank_rows.h"
#include "lowrank_tiles.h"

namespace pyengine {
namespace PYENGINE_ISA_NS {
namespace {

constexpr int64_t kRowBlock = 16;

template <typename D>
void rows(const LowRankRowsArgs& a, int64_t begin, int64_t end, float* acc) {
  using T = typename D::T;
  const int64_t K = a.cols, M = a.dst_cols, rp = a.proj_rank, rg = a.grad_rank, ra = a.add_rank;
  const T* src = static_cast<const T*>(a.src);
  T* dst = static_cast<T*>(a.dst);
  for (int64_t n0 = begin; n0 < end; n0 += kRowBlock) {
    const int64_t n = std::min(end, n0 + kRowBlock) - n0;
    const uint8_t* smask = a.src_mask ? a.src_mask + n0 * K : nullptr;
    if (rp) {
      std::fill(a.proj_out + n0 * rp, a.proj_out + (n0 + n) * rp, 0.f);
      lowrank::proj<D>(src + n0 * K, K, smask, n, K, a.proj_w, K, rp, a.scale,
                       a.proj_out + n0 * rp, rp);
    }
    if (rg) lowrank::grad<D>(src + n0 * K, K, smask, n, K, a.grad_coef + n0 * rg, rg, rg, acc, K);
    if (ra) {
      const float* coef = a.add_coef ? a.add_coef : a.proj_out;  // chained: this block's proj
      lowrank::add<D>(dst + n0 * M, M, a.dst_mask ? a.dst_mask + n0 * M : nullptr, n, M,
                      coef + n0 * ra, ra, ra, a.add_w, M, a.alpha);
    }
  }
}

}  // namespace

void lowrank_rows_range(const LowRankRowsArgs& a, int64_t begin, int64_t end, float* acc) {
  switch (a.dtype) {
    case kF32: rows<F32>(a, begin, end, acc); break;
    case kBF16: rows<BF16>(a, begin, end, acc); break;
    default: rows<F16>(a, begin, end, acc); break;
  }
}

}  // namespace PYENGINE_ISA_NS
}  // namespace pyengine
