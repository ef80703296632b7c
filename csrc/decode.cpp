// The decode step of decode.h: the GEMMs are csrc/quant.h's kernels, the LoRA deltas
// lora_gather.h's, attention is decode_impl.h (per ISA), silu * up swiglu.h's (per ISA:
// this file is the scalar build, where exp_approx does not vectorize); the small ops
// (rmsnorm, RoPE) are plain loops over rows, a few microseconds a layer next to the weight
// reads.  Also the scalar build of decode_impl.h.
#define PYENGINE_ISA_NS scalar
#include "decode_impl.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>
#include <thread>

#include "common.h"
#include "cpu_features.h"
#include "lora_gather.h"
#include "parallel.h"
#include "swiglu.h"

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

// fn(i) for every row i in [0, rows): on the caller for a few rows, else on the pool.
template <typename Fn>
void for_rows(int64_t rows, int num_threads, const Fn& fn) {
  parallel_for(rows, num_threads, 16, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) fn(i);
  });
}

std::string range(int64_t lo, int64_t hi) {
  return "[" + std::to_string(lo) + ", " + std::to_string(hi) + ")";
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
                       void* kv_cache, const float* rope, int64_t max_rows)
    : c_(cfg), layers_(std::move(layers)), embed_(embed), final_norm_(final_norm), head_(head),
      kv_(kv_cache), rope_(rope), fmt_(head.w.fmt), max_rows_(max_rows),
      max_tasks_(std::max(1u, std::thread::hardware_concurrency())) {
  const int64_t H = c_.hidden, I = c_.intermediate, d = c_.head_dim, nh = c_.n_heads,
                nkv = c_.n_kv_heads, R = max_rows;
  if (d <= 0 || d % 16 || d > kMaxHeadDim || nkv <= 0 || nh % nkv)
    throw std::invalid_argument("decode step: head_dim " + std::to_string(d) +
                                " must be a positive multiple of 16 up to " +
                                std::to_string(kMaxHeadDim) + " and n_heads " +
                                std::to_string(nh) + " a multiple of n_kv_heads " +
                                std::to_string(nkv));
  if (c_.slots < 1 || R < 1)
    throw std::invalid_argument("decode step: slots " + std::to_string(c_.slots) +
                                " and max_rows " + std::to_string(R) + " must be >= 1");
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
  written_.reserve(size_t(R));
  x_ = alloc(4 * R * H);
  xn_ = alloc(4 * R * H);
  qkv_ = alloc(4 * R * (nh + 2 * nkv) * d);
  attn_ = alloc(4 * R * nh * d);
  out_ = alloc(4 * R * H);
  gu_ = alloc(4 * R * 2 * I);
  h_ = alloc(4 * R * I);
  act_ = alloc(R * act);
  scores_ = alloc(4 * max_tasks_ * std::min(nh / nkv, kMaxGroup) * c_.max_len);
}

void DecodeStep::set_lora(std::vector<DecodeLayerLora> lora) {
  if (!lora.empty() && lora.size() != layers_.size())
    throw std::invalid_argument("decode step: LoRA stacks for " + std::to_string(lora.size()) +
                                " layers, the model has " + std::to_string(layers_.size()));
  int64_t n_adapters = 0;
  for (size_t i = 0; i < lora.size(); ++i) {
    const DecodeLayerLora& L = lora[i];
    for (const DecodeLora* l : {&L.qkv, &L.o, &L.gate_up, &L.down}) {
      if (l->n_adapters < 0 || l->rank < 0)
        throw std::invalid_argument("decode step: layer " + std::to_string(i) +
                                    " LoRA n_adapters / rank must be >= 0");
      if (l->n_adapters == 0) continue;  // rank 0: adapters that leave this linear alone
      if (n_adapters && l->n_adapters != n_adapters)
        throw std::invalid_argument("decode step: layer " + std::to_string(i) + " LoRA stack of " +
                                    std::to_string(l->n_adapters) + " adapters, others have " +
                                    std::to_string(n_adapters));
      n_adapters = l->n_adapters;
    }
  }
  lora_ = std::move(lora);
  n_adapters_ = n_adapters;
}

void DecodeStep::check(const DecodeRows& r) {
  if (r.rows < 1 || r.rows > max_rows_)
    throw std::invalid_argument("decode step: " + std::to_string(r.rows) +
                                " rows, allowed 1.." + std::to_string(max_rows_) +
                                " (max_rows)");
  if (r.gemm_from < 0 || r.gemm_from > r.rows)
    throw std::invalid_argument("decode step: gemm_from " + std::to_string(r.gemm_from) +
                                " outside [0, " + std::to_string(r.rows) + "]");
  if (r.n_out < 0 || r.n_out > r.rows)
    throw std::invalid_argument("decode step: " + std::to_string(r.n_out) +
                                " logit rows for " + std::to_string(r.rows) + " rows");
  written_.clear();
  for (int64_t i = 0; i < r.rows; ++i) {
    auto row = [i] { return "decode step: row " + std::to_string(i) + ": "; };  // errors only
    if (r.tokens[i] < 0 || r.tokens[i] >= c_.vocab)
      throw std::invalid_argument(row() + "token id " + std::to_string(r.tokens[i]) +
                                  " outside the vocabulary " + range(0, c_.vocab));
    if (r.slots[i] < 0 || r.slots[i] >= c_.slots)
      throw std::invalid_argument(row() + "slot " + std::to_string(r.slots[i]) +
                                  " outside the KV cache slots " + range(0, c_.slots));
    if (r.positions[i] < 0 || r.positions[i] >= c_.max_len)
      throw std::invalid_argument(row() + "position " + std::to_string(r.positions[i]) +
                                  " outside the KV cache " + range(0, c_.max_len));
    if (r.adapters[i] < -1 || r.adapters[i] >= n_adapters_)
      throw std::invalid_argument(row() + "adapter index " + std::to_string(r.adapters[i]) +
                                  " outside " + range(-1, n_adapters_) +
                                  " (-1: none; the LoRA stacks hold " +
                                  std::to_string(n_adapters_) + ")");
    written_.emplace_back(r.slots[i], r.positions[i]);
  }
  for (int64_t i = 0; i < r.n_out; ++i)
    if (r.logit_rows[i] < 0 || r.logit_rows[i] >= r.rows)
      throw std::invalid_argument("decode step: logit row " + std::to_string(r.logit_rows[i]) +
                                  " outside the rows " + range(0, r.rows));
  std::sort(written_.begin(), written_.end());
  const auto dup = std::adjacent_find(written_.begin(), written_.end());
  if (dup != written_.end())
    throw std::invalid_argument("decode step: two rows write slot " + std::to_string(dup->first) +
                                " position " + std::to_string(dup->second));
}

void DecodeStep::linear(const DecodeLinear& lin, const DecodeLora* lora, const float* x,
                        int64_t m, int64_t gemm_from, const int64_t* adapters, float* y,
                        int num_threads) {
  const int64_t split = m - gemm_from >= kGemmMinRows && amx_active() ? gemm_from : m;
  if (split > 0) {
    quant_quantize_activations(fmt_, x, kF32, split, lin.w.k, act_.get(), num_threads);
    quant_matmul_act(lin.w, act_.get(), split, lin.bias, y, kF32, num_threads);
  }
  if (split < m)
    quant_matmul_amx(lin.w, x + split * lin.w.k, m - split, lin.bias, y + split * lin.w.n,
                     num_threads);
  if (lora)
    lora_gather_add(x, m, lin.w.k, adapters, lora->a, lora->b, lora->n_adapters, lora->rank,
                    lin.w.n, y, num_threads);
}

void DecodeStep::attention(int64_t layer, const DecodeRows& r, int num_threads) {
  const int64_t d = c_.head_dim, nh = c_.n_heads, nkv = c_.n_kv_heads, groups = nh / nkv;
  const int64_t elem = c_.kv_dtype == kF32 ? 4 : 2, kv_stride = c_.max_len * d;
  const int64_t slot_stride = int64_t(layers_.size()) * 2 * nkv * kv_stride;
  const float scale = 1.0f / std::sqrt(float(d));
  const float* qkv = f32(qkv_);
  const uint8_t* cache = static_cast<const uint8_t*>(kv_);
  auto attend = attend_kernel();
  // Jobs of (row, kv head, chunk of its query heads) claimed from a counter (rows attend
  // over different lengths): a whole group per job reads each cached k, v once for all its
  // query heads; with few rows, one query head per job keeps the threads busy.  Each job's
  // output is computed by one thread, so the claim order does not matter.
  const int64_t chunk = std::min(r.rows * nkv >= 4 * num_threads ? groups : 1, kMaxGroup);
  const int64_t chunks = (groups + chunk - 1) / chunk, jobs = r.rows * nkv * chunks;
  const int n_tasks = int(std::min<int64_t>({std::max(num_threads, 1), jobs, max_tasks_}));
  std::atomic<int64_t> next{0};
  parallel_for(n_tasks, n_tasks, 1, [&](int64_t task, int64_t) {
    float* scores = f32(scores_) + task * chunk * c_.max_len;
    for (int64_t j; (j = next.fetch_add(1)) < jobs;) {
      const int64_t i = j / (nkv * chunks), g = j / chunks % nkv;
      const int64_t h = g * groups + j % chunks * chunk, heads = std::min(chunk, (g + 1) * groups - h);
      const uint8_t* k =
          cache + ((r.slots[i] * slot_stride) + (layer * 2 * nkv + g) * kv_stride) * elem;
      attend(qkv + i * (nh + 2 * nkv) * d + h * d, heads, k, k + nkv * kv_stride * elem,
             c_.kv_dtype, r.positions[i] + 1, d, scale, scores, f32(attn_) + (i * nh + h) * d);
    }
  });
}

void DecodeStep::run(const DecodeRows& r, float* logits, int num_threads) {
  check(r);
  const int64_t H = c_.hidden, I = c_.intermediate, d = c_.head_dim, nh = c_.n_heads,
                nkv = c_.n_kv_heads, R = r.rows, width = (nh + 2 * nkv) * d;
  const int64_t elem = c_.kv_dtype == kF32 ? 4 : 2;
  const int64_t slot_stride = int64_t(layers_.size()) * 2 * nkv * c_.max_len * d;
  float *x = f32(x_), *xn = f32(xn_), *qkv = f32(qkv_), *out = f32(out_), *gu = f32(gu_),
        *hid = f32(h_);
  for (int64_t i = 0; i < R; ++i) std::memcpy(x + i * H, embed_ + r.tokens[i] * H, size_t(4 * H));
  for (size_t li = 0; li < layers_.size(); ++li) {
    const DecodeLayer& L = layers_[li];
    const DecodeLayerLora* lora = n_adapters_ ? &lora_[li] : nullptr;
    for_rows(R, num_threads, [&](int64_t i) {
      rms_norm(x + i * H, L.attn_norm, H, c_.eps, xn + i * H);
    });
    linear(L.qkv, lora ? &lora->qkv : nullptr, xn, R, r.gemm_from, r.adapters, qkv,
           num_threads);
    for_rows(R, num_threads, [&](int64_t i) {
      float* row = qkv + i * width;
      const float* rot = rope_ + r.positions[i] * d;  // (cos, sin) pairs of this position
      for (int64_t h = 0; h < nh + nkv; ++h) {        // q heads, then k heads
        float* v = row + h * d;
        for (int64_t j = 0; j < d / 2; ++j) {
          const float re = v[2 * j], im = v[2 * j + 1], c = rot[2 * j], s = rot[2 * j + 1];
          v[2 * j] = re * c - im * s;
          v[2 * j + 1] = re * s + im * c;
        }
      }
      for (int64_t part = 0; part < 2; ++part) {  // k, then v, at (slot, pos) of each kv head
        const float* src = row + (nh + part * nkv) * d;
        for (int64_t g = 0; g < nkv; ++g) {
          const int64_t at = r.slots[i] * slot_stride +
                             (((int64_t(li) * 2 + part) * nkv + g) * c_.max_len + r.positions[i]) * d;
          if (elem == 4) {
            std::memcpy(static_cast<float*>(kv_) + at, src + g * d, size_t(4 * d));
          } else {
            uint16_t* dst = static_cast<uint16_t*>(kv_) + at;
            for (int64_t j = 0; j < d; ++j) dst[j] = f32_to_bf16(src[g * d + j]);
          }
        }
      }
    });
    attention(int64_t(li), r, num_threads);
    linear(L.o, lora ? &lora->o : nullptr, f32(attn_), R, r.gemm_from, r.adapters, out,
           num_threads);
    for_rows(R, num_threads, [&](int64_t i) {
      for (int64_t j = 0; j < H; ++j) x[i * H + j] += out[i * H + j];
      rms_norm(x + i * H, L.mlp_norm, H, c_.eps, xn + i * H);
    });
    linear(L.gate_up, lora ? &lora->gate_up : nullptr, xn, R, r.gemm_from, r.adapters, gu,
           num_threads);
    for (int64_t i = 0; i < R; ++i)  // silu(gate) * up, vectorized per ISA (swiglu.h)
      swiglu_forward({kF32, I, gu + i * 2 * I, gu + i * 2 * I + I, nullptr, hid + i * I, nullptr,
                      nullptr},
                     num_threads);
    linear(L.down, lora ? &lora->down : nullptr, hid, R, r.gemm_from, r.adapters, out,
           num_threads);
    for_rows(R, num_threads, [&](int64_t i) {
      for (int64_t j = 0; j < H; ++j) x[i * H + j] += out[i * H + j];
    });
  }
  if (r.n_out == 0) return;
  for (int64_t o = 0; o < r.n_out; ++o)  // xn: the logit rows, normed, in order
    rms_norm(x + r.logit_rows[o] * H, final_norm_, H, c_.eps, xn + o * H);
  linear(head_, nullptr, xn, r.n_out, r.n_out, nullptr, logits, num_threads);
}

}  // namespace pyengine
