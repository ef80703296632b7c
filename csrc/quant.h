// Weight-only quantized matmul (q8_0 / q4_0 / nf4): the C++ half of pyengine.ops.quant_matmul.
//
//   y[t, n] = sum_k x[t, k] * w[n, k] + bias[n],   w = dequant(qs, scales)  (pyengine/quant.py)
//
// Weights come as QuantizedWeight's two planes: qs [N, K*bits/8] (GGUF quant bytes,
// 16-block groups interleaved in 4-byte words) and fp16 scales [N, K/B].
// x [M, K] (fp32 or bf16) is first quantized per weight-sized block to int8 (d_a =
// absmax/127, q = round-half-even(x/d_a)) into an activation buffer laid out so that one
// 64-byte load of weight quants meets its activations without any shuffle (see
// quant_impl.h).  The dot product of a block is then integer: u8 weights (q8_0: w^0x80 =
// w+128, q4_0: q, nf4: int8 code + 128) times s8 activations (AVX-512 VNNI vpdpbusd;
// AVX2: vpmaddubsw + vpmaddwd), the constant weight offset removed exactly per block via
// the precomputed offset * sum(q_a).  Float math: y = sum_blocks d_w * d_a * isum (fp32).
// nf4 uses int8 code values round(127 * NF4[i]) (max error 0.5/127 of the block absmax).
// Weights are read in QuantizedWeight's interleaved layout (16 blocks per 64-byte load,
// one SIMD lane per block; see quant_impl.h).  All ISA variants give identical outputs.
//
// Floor: GEMV (M = 1) reads N*K*bits/8 + 2*N*K/B weight bytes once; GEMM does 2*M*N*K
// int8 ops.  Threads split the N rows.
//
// quant_dequantize writes rows of dequant(W) as fp32 or bf16 (round to nearest even),
// bit-identical to pyengine.quant.dequantize_rows (then .to(bfloat16)): w = q * d in fp32
// (q8_0: q int8; q4_0: q - 8; nf4: the fp32 NF4 code value).  It feeds torch's GEMM where
// that beats the integer kernel (training-sized batches, and grad_x = dy @ W).  Floor:
// memory-bound, reads bits/8 + 2/B bytes and writes 4 (fp32) or 2 (bf16) bytes a weight.
#pragma once
#include <cstdint>

namespace pyengine {

enum QuantFmt : int { kQ8_0 = 0, kQ4_0 = 1, kNF4 = 2 };

struct QuantWeights {
  int fmt;
  const uint8_t* qs;       // [n, k * bits / 8]
  const uint16_t* scales;  // [n, k / block] fp16
  int64_t n, k;
};

// Bytes of one token's quantized activations (padded to whole groups of 16 blocks).
int64_t quant_act_row_bytes(int fmt, int64_t k);

// x [m, k] (dtype fp32 / bf16) -> act [m, quant_act_row_bytes] (64-byte aligned rows).
void quant_quantize_activations(int fmt, const void* x, int x_dtype, int64_t m, int64_t k,
                                uint8_t* act, int num_threads);

// y [m, n] (y_dtype fp32 / bf16) = act @ dequant(w).T + bias, act already quantized by
// quant_quantize_activations (the decode step quantizes once per activation vector).
void quant_matmul_act(const QuantWeights& w, const uint8_t* act, int64_t m, const float* bias,
                      void* y, int y_dtype, int num_threads);

// y [m, n] (dtype of x) = x @ dequant(w).T + bias (bias fp32 [n] or null).
void quant_matmul(const QuantWeights& w, const void* x, int x_dtype, int64_t m,
                  const float* bias, void* y, int num_threads);

// out [row_end - row_begin, k] (out_dtype fp32 / bf16) = dequant(w) rows [row_begin, row_end).
void quant_dequantize(const QuantWeights& w, int64_t row_begin, int64_t row_end, void* out,
                      int out_dtype, int num_threads);

#define PYENGINE_QUANT_DECLS                                                                \
  void quantize_act_rows(int fmt, const void* x, int x_dtype, int64_t k, int64_t row_begin, \
                         int64_t row_end, uint8_t* act);                                    \
  void matmul_rows(const QuantWeights& w, const uint8_t* act, int64_t m, int64_t row_begin, \
                   int64_t row_end, const float* bias, void* y, int y_dtype);            \
  void dequantize_rows(const QuantWeights& w, int64_t row_begin, int64_t row_end, void* out,  \
                       int out_dtype);
namespace scalar { PYENGINE_QUANT_DECLS }
namespace avx2 { PYENGINE_QUANT_DECLS }
namespace avx512 { PYENGINE_QUANT_DECLS }
#undef PYENGINE_QUANT_DECLS

}  // namespace pyengine
