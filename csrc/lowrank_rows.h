// The low-rank engine: the skinny products of LoRA (pyengine.ops.lora_linear and the
// [N, H] side of pyengine.ops.lora_mlp) fused into one pass over the rows of src [N, K]
// and dst [N, M]:
//
//   proj: proj_out  = scale * (src * src_mask) @ proj_w.T     [N, rp]   (x @ A.T, dy @ B)
//   grad: grad_out += grad_coef.T @ (src * src_mask)          [rg, K]   (dA, dB.T)
//   add:  dst      += alpha * (add_coef @ add_w) * dst_mask   [N, M]    (y += s u B.T, dx += ...)
//
// Any subset runs in the same pass (rank 0 / null pointer skips a part); add_coef null
// with add_rank = proj_rank chains the add onto this pass's proj_out (u = x A.T then
// y += s u B.T without a second pass over x).  src / dst share one DType (fp32, bf16,
// fp16; dst updated in place, rounded once); masks are optional uint8 keep-masks (dropout;
// the 1/(1-p) goes in scale / alpha); every low-rank operand and result is fp32 (math in
// fp32), so a bf16 model with fp32 adapters needs no [N, *] dtype conversion.
// Threads: parallel_sum_rows, so grad_out (and everything else) has the same bits on any
// thread count.  Floor: reading src (and reading + writing dst) once: N*(K + 2M) elements;
// 2 N (K (rp + rg) + M ra) flops.
#pragma once
#include <cstdint>

namespace pyengine {

struct LowRankRowsArgs {
  int dtype;                // DType of src and dst
  int64_t n_rows, cols;     // N, K (src)
  const void* src;          // [N, K] (proj, grad)
  const uint8_t* src_mask;  // [N, K] or null
  int64_t proj_rank;
  const float* proj_w;      // [rp, K]
  float* proj_out;          // [N, rp]
  float scale;              // multiplies proj_out
  int64_t grad_rank;
  const float* grad_coef;   // [N, rg]
  float* grad_out;          // [rg, K], accumulated (caller zeroes)
  int64_t add_rank;
  const float* add_coef;    // [N, ra]; null: proj_out (ra == rp)
  const float* add_w;       // [ra, M]
  float alpha;              // multiplies the added product
  void* dst;                // [N, M]
  int64_t dst_cols;         // M
  const uint8_t* dst_mask;  // [N, M] or null
};

void lowrank_rows(const LowRankRowsArgs& a, int num_threads);

// Row-range kernel; grad accumulates into `acc` ([rg * K] fp32, zeroed, one per row block).
#define PYENGINE_LOWRANK_ROWS_DECL \
  void lowrank_rows_range(const LowRankRowsArgs& a, int64_t begin, int64_t end, float* acc);
namespace scalar { PYENGINE_LOWRANK_ROWS_DECL }
namespace avx2 { PYENGINE_LOWRANK_ROWS_DECL }
namespace avx512 { PYENGINE_LOWRANK_ROWS_DECL }
#undef PYENGINE_LOWRANK_ROWS_DECL

}  // namespace pyengine
