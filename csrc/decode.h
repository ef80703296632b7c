// One step of a Llama-family model (Llama / Mistral / Qwen2) with quantized linears over R
// rows: each row is one token of some sequence (its KV cache slot, its position, its LoRA
// adapter or none), so one call decodes many sequences and/or a chunk of a prefill.  Every
// linear runs once for all R rows (one quantized GEMM, the weights read once per step: this
// is where batching wins), plus a few pool wake-ups per layer instead of ~20 torch dispatches
// per layer.  The torch path (pyengine/infer/model.py) is the spec.
//
//   per row r:  x = embed[token[r]]
//   per layer:  q,k,v = split(qkv(rms(x)) + bias + lora);  rotate q, k at position[r] (RoPE,
//               adjacent pairs);  then, once every row has written its k, v into
//               cache[slot[r], layer] at position[r], each row attends over its slot's
//               positions 0..position[r] (so a prefill chunk is causal):
//               a = softmax(q k^T / sqrt(d)) v  (query head h reads kv head h / (nh / nkv));
//               x += o(a) + lora;  g,u = split(gate_up(rms(x)) + lora);
//               x += down(silu(g) * u) + lora
//   logits[i] = head(rms(x[logit_rows[i]]))   (only the rows asked for)
// lora: y[r] += b[adapter[r]] @ (a[adapter[r]] @ x[r]) for rows with adapter[r] >= 0
// (lora_gather.h, on the linear's fp32 input; the stacks come from set_lora).
//
// Every GEMM input is quantized per block to int8 once (quant_quantize_activations, the
// same quantization as the torch path's quant_matmul calls).  Prefill rows: the rows from
// DecodeRows::gemm_from on, when there are at least kGemmMinRows of them and AMX is
// active, run the AMX bf16 GEMM instead (quant_matmul_amx, as the torch path's prefill
// does: ~2x faster per token from ~100 rows on; bf16-rounded x and W, fp32 sums), the rows
// before them the int8 GEMM.  Float math: fp32; rmsnorm
// y = x * (1 / sqrt(mean(x^2) + eps)) * w (sum of squares in fp64); softmax (decode_impl.h) and silu
// (swiglu.h) with common.h's exp_approx (< 2 ulp); the KV cache is fp32 or bf16 (k and v rounded to
// nearest even once, when written).  The int8 GEMM computes every (row, output) on its own,
// so a row's logits do not depend on the other rows of the call (bit-identical alone or in
// a batch, given the same cache contents).
// Shapes: embed fp32 [V, H]; norms fp32 [H]; qkv [(nh + 2 nkv) d, H] (q/k rows already in
// adjacent (re, im) pair order), o [H, nh d], gate_up [2I, H] (gate rows, then up rows),
// down [H, I], head [V, H]; cache [slots, layers, 2, nkv, max_len, d] (a single stream's
// [layers, ...] cache is slots == 1); rope [max_len, d/2, 2] (cos, sin) fp32; logits fp32
// [n_out, V].  The caller owns the cache contents: a row at position p attends to whatever
// its slot holds at 0..p-1 (written by earlier calls or by earlier rows of this call).
// Threads: one pool job per GEMM (weight rows), one for attention ((row, query head) jobs),
// row-parallel small ops.  Every output element is computed by one thread in a fixed order,
// so the logits are bit-identical for any thread count (attention is compiled per ISA, so
// ISAs may differ in the last bits).  Scratch is allocated once for max_rows rows.  One
// object runs one call at a time (not reentrant).
// Floor per step: the quantized weight bytes once for all rows (LM head included) + each
// row's 2 * layers * nkv * (pos + 1) * d cache elements + each used adapter's stacks once.
#pragma once
#include <cstdint>
#include <memory>
#include <utility>
#include <vector>

#include "quant.h"

namespace pyengine {

struct DecodeLinear {
  QuantWeights w;
  const float* bias;  // [n] or null
};

struct DecodeLayer {
  const float* attn_norm;
  DecodeLinear qkv, o;
  const float* mlp_norm;
  DecodeLinear gate_up, down;
};

// One linear's adapter stacks (lora_gather.h): a [n_adapters, rank, k], b [n_adapters, n,
// rank] fp32; n_adapters == 0 or rank == 0: no LoRA on this linear.
struct DecodeLora {
  const float* a;
  const float* b;
  int64_t n_adapters, rank;
};

struct DecodeLayerLora {
  DecodeLora qkv, o, gate_up, down;
};

struct DecodeConfig {
  int64_t hidden, intermediate, n_heads, n_kv_heads, head_dim, vocab, max_len, slots;
  float eps;
  int kv_dtype;  // kF32 / kBF16
};

// The rows of one call: tokens, slots, positions, adapters [rows] (adapter -1: base only);
// logit_rows [n_out]: the rows whose next-token logits are wanted.
struct DecodeRows {
  const int64_t *tokens, *slots, *positions, *adapters;
  int64_t rows;
  const int64_t* logit_rows;
  int64_t n_out;
  int64_t gemm_from;  // rows [gemm_from, rows) may take the AMX GEMM (rows: never)
};

// Prefill rows that make the AMX GEMM worth it (pyengine.ops.quant.GEMM_MIN_ROWS).
constexpr int64_t kGemmMinRows = 96;

class DecodeStep {
 public:
  // Throws std::invalid_argument naming the mismatch (shapes, formats, dtype).
  DecodeStep(const DecodeConfig& cfg, std::vector<DecodeLayer> layers, const float* embed,
             const float* final_norm, DecodeLinear head, void* kv_cache, const float* rope,
             int64_t max_rows);
  // The adapter stacks, one entry per layer (empty: no LoRA); replaces the previous ones.
  // Throws std::invalid_argument on a layer count or n_adapters mismatch.
  void set_lora(std::vector<DecodeLayerLora> lora);
  // Writes every row's k, v into the cache and logits [n_out, vocab].  Throws
  // std::invalid_argument (nothing written) on a bad token, slot, position, adapter, logit
  // row, row count, or two rows writing the same slot and position.
  void run(const DecodeRows& rows, float* logits, int num_threads);

 private:
  struct FreeDeleter {
    void operator()(void* p) const;
  };
  using Buffer = std::unique_ptr<uint8_t, FreeDeleter>;
  static Buffer alloc(int64_t bytes);
  float* f32(const Buffer& b) const { return reinterpret_cast<float*>(b.get()); }
  void check(const DecodeRows& r);
  void linear(const DecodeLinear& lin, const DecodeLora* lora, const float* x, int64_t m,
              int64_t gemm_from, const int64_t* adapters, float* y, int num_threads);
  void attention(int64_t layer, const DecodeRows& r, int num_threads);

  DecodeConfig c_;
  std::vector<DecodeLayer> layers_;
  std::vector<DecodeLayerLora> lora_;
  int64_t n_adapters_ = 0;  // of the bank (every linear has this many or none)
  const float* embed_;
  const float* final_norm_;
  DecodeLinear head_;
  void* kv_;
  const float* rope_;
  int fmt_;
  int64_t max_rows_, max_tasks_;
  std::vector<std::pair<int64_t, int64_t>> written_;  // (slot, position) per row, for check()
  // scratch, allocated once for max_rows: residual, normed input, qkv, attention output,
  // o/down output, gate_up, mlp hidden, quantized activations, attention scores per task
  Buffer x_, xn_, qkv_, attn_, out_, gu_, h_, act_, scores_;
};

// Attention of `heads` query heads that share one kv head (decode_impl.h), compiled per
// ISA: out[h, d] = softmax(q[h] k^T * scale) v over cache rows [0, len) (kv_dtype fp32 /
// bf16); q, out: [heads, d]; scores: [heads, len] scratch; heads <= kMaxGroup,
// d <= kMaxHeadDim.  Bit-identical to one call per head.
constexpr int64_t kMaxGroup = 16, kMaxHeadDim = 512;
#define PYENGINE_DECODE_DECLS                                                                \
  void decode_attend(const float* q, int64_t heads, const void* keys, const void* values,  \
                     int kv_dtype, int64_t len, int64_t d, float scale, float* scores,     \
                     float* out);
namespace scalar { PYENGINE_DECODE_DECLS }
namespace avx2 { PYENGINE_DECODE_DECLS }
namespace avx512 { PYENGINE_DECODE_DECLS }
#undef PYENGINE_DECODE_DECLS

}  // namespace pyengine
