// One decode step of a Llama-family model (Llama / Mistral / Qwen2) with quantized linears:
// one token through the whole model in one call, so the per-token cost is the weight reads
// (the quantized GEMVs of csrc/quant.h) plus a few pool wake-ups per layer, not ~20 torch
// dispatches per layer.  The torch path (pyengine/infer/model.py) is the spec.
//
//   x = embed[token]
//   per layer:  q,k,v = split(qkv(rms(x)) + bias);  rotate q, k (RoPE, adjacent pairs);
//               cache[k, v at pos];  a = softmax(q k^T / sqrt(d)) v over positions 0..pos
//               (query head h reads kv head h / (n_heads / n_kv_heads));
//               x += o(a);  g,u = split(gate_up(rms(x)));  x += down(silu(g) * u)
//   logits = head(rms(x))
//
// Every GEMV input is quantized per block to int8 once (quant_quantize_activations, the
// same quantization as the torch path's quant_matmul calls).  Float math: fp32; rmsnorm
// y = x * (1 / sqrt(mean(x^2) + eps)) * w (sum of squares in fp64); softmax and silu with
// common.h's exp_approx (< 2 ulp); the KV cache is fp32 or bf16 (k and v rounded to
// nearest even once, when written).
// Shapes: embed fp32 [V, H]; norms fp32 [H]; qkv [(nh + 2 nkv) d, H] (q/k rows already in
// adjacent (re, im) pair order), o [H, nh d], gate_up [2I, H] (gate rows, then up rows),
// down [H, I], head [V, H]; cache [layers, 2, nkv, max_len, d]; rope [max_len, d/2, 2]
// (cos, sin) fp32; logits fp32 [V].
// Threads: one pool job per GEMV (rows) and one for attention (query heads); the rest runs
// on the caller.  Every output element is computed by one thread in a fixed order, so the
// logits are bit-identical for any thread count (attention is compiled per ISA, so ISAs
// may differ in the last bits).
// Floor per token: the quantized weight bytes once (LM head included) + 2 * layers * nkv *
// (pos + 1) * d cache elements.
#pragma once
#include <cstdint>
#include <memory>
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

struct DecodeConfig {
  int64_t hidden, intermediate, n_heads, n_kv_heads, head_dim, vocab, max_len;
  float eps;
  int kv_dtype;  // kF32 / kBF16
};

class DecodeStep {
 public:
  // Throws std::invalid_argument naming the mismatch (shapes, formats, dtype).
  DecodeStep(const DecodeConfig& cfg, std::vector<DecodeLayer> layers, const float* embed,
             const float* final_norm, DecodeLinear head, void* kv_cache, const float* rope);
  // Token `token` at position `pos` (0 <= pos < max_len): writes its k, v into the cache and
  // the next-token logits [vocab] into `logits`.  Throws std::out_of_range on a bad token/pos.
  void run(int64_t token, int64_t pos, float* logits, int num_threads);

 private:
  struct FreeDeleter {
    void operator()(void* p) const;
  };
  using Buffer = std::unique_ptr<uint8_t, FreeDeleter>;
  static Buffer alloc(int64_t bytes);
  float* f32(const Buffer& b) const { return reinterpret_cast<float*>(b.get()); }
  void gemv(const DecodeLinear& lin, const float* x, float* y, int num_threads);
  void attention(int64_t layer, int64_t pos, int num_threads);

  DecodeConfig c_;
  std::vector<DecodeLayer> layers_;
  const float* embed_;
  const float* final_norm_;
  DecodeLinear head_;
  void* kv_;
  const float* rope_;
  int fmt_;
  // scratch, allocated once: residual, normed input, qkv, attention output, o/down output,
  // gate_up, mlp hidden, quantized activations, attention scores per query head
  Buffer x_, xn_, qkv_, attn_, out_, gu_, h_, act_, scores_;
};

// One query head's attention (decode_impl.h), compiled per ISA: out[d] = softmax(q k^T *
// scale) v over cache rows [0, len) (kv_dtype fp32 / bf16); scores: [len] scratch.
#define PYENGINE_DECODE_DECLS                                                                \
  void decode_attend(const float* q, const void* keys, const void* values, int kv_dtype,   \
                     int64_t len, int64_t d, float scale, float* scores, float* out);
namespace scalar { PYENGINE_DECODE_DECLS }
namespace avx2 { PYENGINE_DECODE_DECLS }
namespace avx512 { PYENGINE_DECODE_DECLS }
#undef PYENGINE_DECODE_DECLS

}  // namespace pyengine
