// The decode step of decode.h: the GEMVs are csrc/quant.h's kernels, attention is
// decode_impl.h (per ISA); the small ops (rmsnorm, RoPE, silu * up) are plain loops, a few
// microseconds a layer next to the weight reads.  Also the scalar build of decode_impl.h.
#define PYENGINE_ISA_NS scalar
#include "decode_impl.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

#include "common.h"
#include "cpu_features.h"
#include "parallel.h"

namespace pyengine {
namespace {

void check_linear(const DecodeLinear& l, int fmt, int64_t n, int64_t k, const std::string& what) {
  if (l.w.fmt != fmt)
    throw std::invalid_argument(what + ": format code " + std::to_string(l.w.fmt) +
                                ", the other linears use " + std::to_string(fmt));
  if (l.w.n != n || l.w.k != k)
    throw std::invalid_argument(what + ": weight [" + std::to_string(l.w.n) + ", " +
                                std::to_string(l.w.k) + "], expected [" + std::to_string(n) +
                                ", " + std::to_string(k) + "]");
}

void rms_norm(const float* x, const float* w, int64_t n, float eps, float* y) {
  double ss = 0.0;
  for (int64_t i = 0; i < n; ++i) ss += double(x[i]) * x[i];
  const float inv = 1.0f / std::sqrt(float(ss / double(n)) + eps);
  for (int64_t i = 0; i < n; ++i) y[i] = x[i] * inv * w[i];
}

decltype(&scalar::decode_attend) attend_kernel() {
  switch (active_isa()) {
    case Isa::kAvx512: return avx512::decode_attend;
    case Isa::kAvx2: return avx2::decode_attend;
    default: return scalar::decode_attend;
  }
}

}  // namespace

void DecodeStep::FreeDeleter::operator()(void* p) const { std::free(p); }

DecodeStep::Buffer DecodeStep::alloc(int64_t bytes) {
  const size_t size = size_t((std::max<int64_t>(bytes, 1) + 63) / 64 * 64);
  void* p = std::aligned_alloc(64, size);
  if (!p) throw std::bad_alloc();
  std::memset(p, 0, size);
  return Buffer(static_cast<uint8_t*>(p));
}

DecodeStep::DecodeStep(const DecodeConfig& cfg, std::vector<DecodeLayer> layers,
                       const float* embed, const float* final_norm, DecodeLinear head,
                       void* kv_cache, const float* rope)
    : c_(cfg), layers_(std::move(layers)), embed_(embed), final_norm_(final_norm), head_(head),
      kv_(kv_cache), rope_(rope), fmt_(head.w.fmt) {
  const int64_t H = c_.hidden, I = c_.intermediate, d = c_.head_dim, nh = c_.n_heads,
                nkv = c_.n_kv_heads;
  if (d <= 0 || d % 16 || nkv <= 0 || nh % nkv)
    throw std::invalid_argument("decode step: head_dim " + std::to_string(d) +
                                " must be a positive multiple of 16 and n_heads " +
                                std::to_string(nh) + " a multiple of n_kv_heads " +
                                std::to_string(nkv));
  if (c_.kv_dtype != kF32 && c_.kv_dtype != kBF16)
    throw std::invalid_argument("decode step: KV cache dtype code " +
                                std::to_string(c_.kv_dtype) + " (allowed: fp32, bf16)");
  if (fmt_ < kQ8_0 || fmt_ > kNF4)
    throw std::invalid_argument("decode step: unknown quant format code " + std::to_string(fmt_));
  for (size_t i = 0; i < layers_.size(); ++i) {
    const DecodeLayer& L = layers_[i];
    const std::string p = "layer " + std::to_string(i) + " ";
    check_linear(L.qkv, fmt_, (nh + 2 * nkv) * d, H, p + "qkv");
    check_linear(L.o, fmt_, H, nh * d, p + "o");
    check_linear(L.gate_up, fmt_, 2 * I, H, p + "gate_up");
    check_linear(L.down, fmt_, H, I, p + "down");
  }
  check_linear(head_, fmt_, c_.vocab, H, "lm_head");
  const int64_t act = std::max({quant_act_row_bytes(fmt_, H), quant_act_row_bytes(fmt_, nh * d),
                                quant_act_row_bytes(fmt_, I)});
  x_ = alloc(4 * H);
  xn_ = alloc(4 * H);
  qkv_ = alloc(4 * (nh + 2 * nkv) * d);
  attn_ = alloc(4 * nh * d);
  out_ = alloc(4 * H);
  gu_ = alloc(4 * 2 * I);
  h_ = alloc(4 * I);
  act_ = alloc(act);
  scores_ = alloc(4 * nh * c_.max_len);
}

void DecodeStep::gemv(const DecodeLinear& lin, const float* x, float* y, int num_threads) {
  quant_quantize_activations(fmt_, x, kF32, 1, lin.w.k, act_.get(), 1);
  quant_matmul_act(lin.w, act_.get(), 1, lin.bias, y, kF32, num_threads);
}

void DecodeStep::attention(int64_t layer, int64_t pos, int num_threads) {
  const int64_t d = c_.head_dim, nh = c_.n_heads, nkv = c_.n_kv_heads, groups = nh / nkv;
  const int64_t kv_stride = c_.max_len * d;  // one kv head's positions
  const float scale = 1.0f / std::sqrt(float(d));
  const float* q = f32(qkv_);
  const int64_t elem = c_.kv_dtype == kF32 ? 4 : 2;
  const uint8_t* base = static_cast<const uint8_t*>(kv_) + layer * 2 * nkv * kv_stride * elem;
  auto attend = attend_kernel();
  parallel_for(nh, num_threads, 1, [&](int64_t b, int64_t e) {
    for (int64_t h = b; h < e; ++h) {
      const uint8_t* k = base + (h / groups) * kv_stride * elem;
      attend(q + h * d, k, k + nkv * kv_stride * elem, c_.kv_dtype, pos + 1, d, scale,
             f32(scores_) + h * c_.max_len, f32(attn_) + h * d);
    }
  });
}

void DecodeStep::run(int64_t token, int64_t pos, float* logits, int num_threads) {
  if (token < 0 || token >= c_.vocab)
    throw std::invalid_argument("decode step: token id " + std::to_string(token) +
                                " outside the vocabulary [0, " + std::to_string(c_.vocab) + ")");
  if (pos < 0 || pos >= c_.max_len)
    throw std::invalid_argument("decode step: position " + std::to_string(pos) +
                                " outside the KV cache [0, " + std::to_string(c_.max_len) + ")");
  const int64_t H = c_.hidden, I = c_.intermediate, d = c_.head_dim, nh = c_.n_heads,
                nkv = c_.n_kv_heads;
  float *x = f32(x_), *xn = f32(xn_), *qkv = f32(qkv_), *out = f32(out_), *gu = f32(gu_),
        *hid = f32(h_);
  std::memcpy(x, embed_ + token * H, size_t(4 * H));
  const float* rot = rope_ + pos * d;  // (cos, sin) pairs of this position
  const int64_t elem = c_.kv_dtype == kF32 ? 4 : 2;
  for (size_t li = 0; li < layers_.size(); ++li) {
    const DecodeLayer& L = layers_[li];
    rms_norm(x, L.attn_norm, H, c_.eps, xn);
    gemv(L.qkv, xn, qkv, num_threads);
    for (int64_t h = 0; h < nh + nkv; ++h) {  // q heads, then k heads
      float* v = qkv + h * d;
      for (int64_t i = 0; i < d / 2; ++i) {
        const float re = v[2 * i], im = v[2 * i + 1], c = rot[2 * i], s = rot[2 * i + 1];
        v[2 * i] = re * c - im * s;
        v[2 * i + 1] = re * s + im * c;
      }
    }
    for (int64_t part = 0; part < 2; ++part) {  // k, then v, at pos of each kv head
      const float* src = qkv + (nh + part * nkv) * d;
      for (int64_t g = 0; g < nkv; ++g) {
        const int64_t at = (((int64_t(li) * 2 + part) * nkv + g) * c_.max_len + pos) * d;
        if (elem == 4) {
          std::memcpy(static_cast<float*>(kv_) + at, src + g * d, size_t(4 * d));
        } else {
          uint16_t* dst = static_cast<uint16_t*>(kv_) + at;
          for (int64_t i = 0; i < d; ++i) dst[i] = f32_to_bf16(src[g * d + i]);
        }
      }
    }
    attention(int64_t(li), pos, num_threads);
    gemv(L.o, f32(attn_), out, num_threads);
    for (int64_t i = 0; i < H; ++i) x[i] += out[i];
    rms_norm(x, L.mlp_norm, H, c_.eps, xn);
    gemv(L.gate_up, xn, gu, num_threads);
    for (int64_t i = 0; i < I; ++i) {
      const float g = gu[i];
      hid[i] = g / (1.0f + exp_approx(-g)) * gu[I + i];  // vectorizes
    }
    gemv(L.down, hid, out, num_threads);
    for (int64_t i = 0; i < H; ++i) x[i] += out[i];
  }
  rms_norm(x, final_norm_, H, c_.eps, xn);
  gemv(head_, xn, logits, num_threads);
}

}  // namespace pyengine
