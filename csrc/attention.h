// Scaled-dot-product attention for training (flash-style), forward and backward.
//
//   forward:  S = scale * Q K^T (+ mask: causal j > i, key padding, -inf),
//             P = softmax_rows(S),  O = P V,  lse_i = log sum_j exp(S_ij)
//   backward: P recomputed from Q, K and lse (never stored), delta_i = rowsum(dO * O)_i
//             dV = P^T dO,  dP = dO V^T,  dS = P * (dP - delta),
//             dQ = scale * dS K,  dK = scale * dS^T Q
// q, o, dout, dq [B, Hq, S, D]; k, v, dk, dv [B, Hkv, S, D] (GQA: query head h reads kv head
// h / (Hq / Hkv), K/V never expanded); all contiguous, one dtype (fp32, bf16, fp16);
// key_mask [B, S] uint8 (1 = attend) or null; lse [B, Hq, S] fp32.  All math fp32: the
// operands are packed once per call into fp32 tiles (Q pre-scaled, K^T and V^T in key
// blocks), so the tile products are plain fp32 FMA loops.  A row whose keys are all masked
// gets O = 0, lse = -inf and zero gradients.  bf16 on a CPU with AMX (amx_active()) runs
// the tile products on AMX tiles instead (attention_amx.cpp: P and dS rounded to bf16, one
// backward pass per (batch, kv head)).
// Tiling: query blocks of kBQ rows x key blocks of kBK keys, online softmax over key
// blocks; key blocks above the diagonal are skipped when causal.  Parallel over (batch,
// head, query block) forward and for dQ, over (batch, kv head, key block) for dK/dV, which
// loops over the GQA group's query heads and query blocks in a fixed order: every output
// element is written by one task, so bits do not depend on the thread count.
// Floor (FLOPs, causal halves them): forward 4 B Hq S^2 D, backward 10 B Hq S^2 D (this
// kernel does 14: S and dP are recomputed in both backward passes).
#pragma once
#include <cstdint>

namespace pyengine {

constexpr int64_t kAttnBQ = 32;  // query rows per block
constexpr int64_t kAttnBK = 64;  // keys per block

struct AttnArgs {
  int dtype;
  int64_t B, Hq, Hkv, S, D;
  float scale;
  bool causal;
  const uint8_t* key_mask;  // [B, S] or nullptr
  const void* q;
  const void* k;
  const void* v;
  void* o;                  // forward out; backward in (for delta)
  float* lse;               // forward out; backward in
  const void* dout;         // backward
  void* dq;
  void* dk;
  void* dv;
};

void attention_forward(const AttnArgs& a, int num_threads);
void attention_backward(const AttnArgs& a, int num_threads);

// fp32 working copies, padded to Sp = S rounded up to kAttnBK rows and Dp = D rounded up
// to 16 columns (zeros).  Row-major copies are [heads, Sp, Dp]; transposed ones are
// [heads, Sp / kAttnBK, Dp, kAttnBK].
struct AttnPacked {
  int64_t Sp, Dp;
  float* q;      // scale * q, rows
  float* k;      // rows (backward)
  float* kt;     // transposed blocks
  float* v;      // rows (forward)
  float* vt;     // transposed blocks (backward)
  float* dout;   // rows (backward)
  float* delta;  // [B, Hq, Sp] rowsum(dout * o) (backward)
};

// One tensor [heads, S, D] of `dtype` to pack, heads [begin, end) per call.
struct AttnPackJob {
  const void* src;
  int dtype;
  int64_t S, D, Sp, Dp;
  float scale;
  bool transpose;
  float* dst;
  const void* o;  // with dst = dout: also delta[head * Sp + i] = rowsum(dout * o)
  float* delta;
};

#define PYENGINE_ATTN_DECL                                                                 \
  void attn_pack_range(const AttnPackJob& j, int64_t begin, int64_t end);                \
  void attn_forward_range(const AttnArgs& a, const AttnPacked& p, int64_t begin,         \
                          int64_t end);                                                  \
  void attn_dkdv_range(const AttnArgs& a, const AttnPacked& p, int64_t begin, int64_t end); \
  void attn_dq_range(const AttnArgs& a, const AttnPacked& p, int64_t begin, int64_t end);
namespace scalar { PYENGINE_ATTN_DECL }
namespace avx2 { PYENGINE_ATTN_DECL }
namespace avx512 { PYENGINE_ATTN_DECL }
#undef PYENGINE_ATTN_DECL

// bf16 with AMX tiles (attention_amx.cpp), chosen by attention_forward / _backward when
// amx_active(); packs its own bf16 operands.
namespace amx {
void attention_forward(const AttnArgs& a, int num_threads);
void attention_backward(const AttnArgs& a, int num_threads);
}  // namespace amx

}  // namespace pyengine
