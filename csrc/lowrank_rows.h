// Skinny low-rank products fused into one pass over the rows of an [N, K] matrix, the
// LoRA pieces of pyengine.ops.lora_mlp that are not next to the activation:
//
//   proj: proj_out = scale * src @ proj_w.T          [N, rp]   (x @ A.T, dy @ B)
//   grad: grad_out += grad_coef.T @ src              [rg, K]   (dA = p.T @ x, dB.T = ha.T @ dy)
//   add:  dst += add_coef @ add_w                    [N, K]    (y += ha @ B.T, dx += p @ A)
//
// Any subset runs in the same pass (a null pointer skips a part).  src / dst are of one
// DType (fp32, bf16, fp16; dst updated in place, rounded once); every low-rank operand and
// result is fp32 (math in fp32), so a bf16 model with fp32 adapters needs no [N, K]
// dtype conversion.  Floor: reading src (and reading + writing dst) once: N*K elements
// each; 2 N K (rp + rg + ra) flops.
#pragma once
#include <cstdint>

namespace pyengine {

struct LowRankRowsArgs {
  int dtype;                // DType of src and dst
  int64_t n_rows, cols;     // N, K
  const void* src;          // [N, K] (proj, grad)
  int64_t proj_rank;
  const float* proj_w;      // [rp, K]
  float* proj_out;          // [N, rp]
  float scale;              // multiplies proj_out
  int64_t grad_rank;
  const float* grad_coef;   // [N, rg]
  float* grad_out;          // [rg, K], accumulated (caller zeroes)
  int64_t add_rank;
  const float* add_coef;    // [N, ra]
  const float* add_w;       // [ra, K]
  void* dst;                // [N, K]
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
