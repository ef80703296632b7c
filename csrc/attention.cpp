// Dispatch, packing and threading for the attention kernels; also their scalar build.
#define PYENGINE_ISA_NS scalar
#include "attention_impl.h"

#include "cpu_features.h"
#include "parallel.h"

namespace pyengine {
namespace {

struct Fns {
  decltype(&scalar::attn_pack_range) pack;
  decltype(&scalar::attn_forward_range) forward, dkdv, dq;
};

Fns pick() {
  switch (active_isa()) {
    case Isa::kAvx512:
      return {avx512::attn_pack_range, avx512::attn_forward_range, avx512::attn_dkdv_range,
              avx512::attn_dq_range};
    case Isa::kAvx2:
      return {avx2::attn_pack_range, avx2::attn_forward_range, avx2::attn_dkdv_range,
              avx2::attn_dq_range};
    default:
      return {scalar::attn_pack_range, scalar::attn_forward_range, scalar::attn_dkdv_range,
              scalar::attn_dq_range};
  }
}

// fp32 working copies of one call (see AttnPacked).
struct Workspace {
  AttnPacked p{};
  std::vector<float> q, k, kt, v, vt, dout, delta;
  Workspace(const AttnArgs& a) {
    p.Sp = (a.S + kAttnBK - 1) / kAttnBK * kAttnBK;
    p.Dp = (a.D + 15) / 16 * 16;
  }
  float* alloc(std::vector<float>& buf, int64_t heads) {
    buf.resize(size_t(heads * p.Sp * p.Dp));
    return buf.data();
  }
};

void pack(const Fns& f, const AttnArgs& a, const Workspace& w, const void* src, int64_t heads,
          float scale, bool transpose, float* dst, int num_threads, const void* o = nullptr,
          float* delta = nullptr) {
  const AttnPackJob j{src, a.dtype, a.S, a.D, w.p.Sp, w.p.Dp, scale, transpose, dst, o, delta};
  parallel_for(heads, num_threads, 1, [&](int64_t b, int64_t e) { f.pack(j, b, e); });
}

int64_t q_tasks(const AttnArgs& a) { return a.B * a.Hq * ((a.S + kAttnBQ - 1) / kAttnBQ); }

}  // namespace

void attention_forward(const AttnArgs& a, int num_threads) {
  if (a.S == 0 || a.B == 0) return;
  if (a.dtype == kBF16 && amx_active()) return amx::attention_forward(a, num_threads);
  const Fns f = pick();
  Workspace w(a);
  const int64_t hq = a.B * a.Hq, hkv = a.B * a.Hkv;
  w.p.q = w.alloc(w.q, hq);
  w.p.kt = w.alloc(w.kt, hkv);
  w.p.v = w.alloc(w.v, hkv);
  pack(f, a, w, a.q, hq, a.scale, false, w.p.q, num_threads);
  pack(f, a, w, a.k, hkv, 1.f, true, w.p.kt, num_threads);
  pack(f, a, w, a.v, hkv, 1.f, false, w.p.v, num_threads);
  parallel_for(q_tasks(a), num_threads, 1,
               [&](int64_t b, int64_t e) { f.forward(a, w.p, b, e); });
}

void attention_backward(const AttnArgs& a, int num_threads) {
  if (a.S == 0 || a.B == 0) return;
  if (a.dtype == kBF16 && amx_active()) return amx::attention_backward(a, num_threads);
  const Fns f = pick();
  Workspace w(a);
  const int64_t hq = a.B * a.Hq, hkv = a.B * a.Hkv;
  w.p.q = w.alloc(w.q, hq);
  w.p.dout = w.alloc(w.dout, hq);
  w.p.k = w.alloc(w.k, hkv);
  w.p.kt = w.alloc(w.kt, hkv);
  w.p.vt = w.alloc(w.vt, hkv);
  w.delta.resize(size_t(hq * w.p.Sp));
  w.p.delta = w.delta.data();
  pack(f, a, w, a.q, hq, a.scale, false, w.p.q, num_threads);
  pack(f, a, w, a.dout, hq, 1.f, false, w.p.dout, num_threads, a.o, w.p.delta);
  pack(f, a, w, a.k, hkv, 1.f, false, w.p.k, num_threads);
  pack(f, a, w, a.k, hkv, 1.f, true, w.p.kt, num_threads);
  pack(f, a, w, a.v, hkv, 1.f, true, w.p.vt, num_threads);
  const int64_t kv_tasks = hkv * (w.p.Sp / kAttnBK);
  parallel_for(kv_tasks, num_threads, 1, [&](int64_t b, int64_t e) { f.dkdv(a, w.p, b, e); });
  parallel_for(q_tasks(a), num_threads, 1, [&](int64_t b, int64_t e) { f.dq(a, w.p, b, e); });
}

}  // namespace pyengine
