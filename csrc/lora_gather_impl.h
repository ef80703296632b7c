// The two sides of lora_gather.h, written once and compiled per ISA (PYENGINE_ISA_NS and the
// flags come from the including TU).  Both run lowrank::proj_block on blocks of kProjRows
// rows of one adapter, given by pointers: x rows gathered by `order` for the A side, y rows
// scattered by it for the B side.
#include <algorithm>

#include "lora_gather.h"
#include "lowrank_tiles.h"

namespace pyengine {
namespace PYENGINE_ISA_NS {

using lowrank::kProjRows;

// task = (group, chunk of kLoraRankChunk ranks): t[p, k0:k1] = x[order[p]] @ a_g[k0:k1]^T
void lora_gather_a_range(const LoraGatherPlan& p, int64_t begin, int64_t end) {
  const int64_t chunks = (p.rank + kLoraRankChunk - 1) / kLoraRankChunk;
  for (int64_t task = begin; task < end; ++task) {
    const LoraGroup& g = p.groups[task / chunks];
    const int64_t k0 = task % chunks * kLoraRankChunk;
    const int64_t kc = std::min(kLoraRankChunk, p.rank - k0);
    const float* w = p.a + (g.adapter * p.rank + k0) * p.k;
    for (int64_t i0 = 0; i0 < g.count; i0 += kProjRows) {
      const int64_t rb = std::min<int64_t>(kProjRows, g.count - i0);
      const float* x[kProjRows];
      const uint8_t* mk[kProjRows] = {};
      float* out[kProjRows];
      for (int i = 0; i < kProjRows; ++i) {
        const int64_t pos = g.begin + i0 + std::min<int64_t>(i, rb - 1);
        x[i] = p.x + p.order[pos] * p.k;
        out[i] = p.t + pos * p.rank + k0;
      }
      for (int64_t i = 0; i < rb; ++i) std::fill(out[i], out[i] + kc, 0.f);
      lowrank::proj_block<F32>(x, mk, rb, p.k, w, p.k, kc, 1.f, out);
    }
  }
}

// y[order[p], c] += sum_j b_g[c, j] t[p, j] for columns c in [begin, end), group by group
void lora_gather_b_range(const LoraGatherPlan& p, int64_t begin, int64_t end) {
  for (int64_t gi = 0; gi < p.n_groups; ++gi) {
    const LoraGroup& g = p.groups[gi];
    const float* w = p.b + (g.adapter * p.n + begin) * p.rank;
    for (int64_t i0 = 0; i0 < g.count; i0 += kProjRows) {
      const int64_t rb = std::min<int64_t>(kProjRows, g.count - i0);
      const float* t[kProjRows];
      const uint8_t* mk[kProjRows] = {};
      float* out[kProjRows];
      for (int i = 0; i < kProjRows; ++i) {
        const int64_t pos = g.begin + i0 + std::min<int64_t>(i, rb - 1);
        t[i] = p.t + pos * p.rank;
        out[i] = p.y + p.order[pos] * p.n + begin;
      }
      lowrank::proj_block<F32>(t, mk, rb, p.rank, w, p.rank, end - begin, 1.f, out);
    }
  }
}

}  // namespace PYENGINE_ISA_NS
}  // namespace pyengine
