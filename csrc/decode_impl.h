// Attention of one query head over the KV cache for the decode step (decode.h), written
// once and compiled per ISA (PYENGINE_ISA_NS = scalar / avx2 / avx512) so the compiler
// vectorizes it with that ISA: every loop below keeps 16 independent lanes (or is
// elementwise), so no reassociation is needed and the order of operations is fixed for an
// ISA (the same bits on any thread count).
#include <algorithm>
#include <cmath>

#include "common.h"
#include "decode.h"

namespace pyengine {
namespace PYENGINE_ISA_NS {
namespace {

inline float load(float v) { return v; }
inline float load(uint16_t v) { return bf16_to_f32(v); }

inline float tree_sum16(const float* a) {
  float s8[8], s4[4];
  for (int i = 0; i < 8; ++i) s8[i] = a[i] + a[i + 8];
  for (int i = 0; i < 4; ++i) s4[i] = s8[i] + s8[i + 4];
  return (s4[0] + s4[2]) + (s4[1] + s4[3]);
}

// out[d] = softmax(q k^T * scale) v over positions [0, len); d a multiple of 16.
template <typename T>
void attend(const float* q, const T* keys, const T* values, int64_t len, int64_t d, float scale,
            float* scores, float* out) {
  float mx = -INFINITY;
  for (int64_t j = 0; j < len; ++j) {
    const T* k = keys + j * d;
    float acc[16] = {0.f};
    for (int64_t i = 0; i < d; i += 16)
      for (int l = 0; l < 16; ++l) acc[l] += q[i + l] * load(k[i + l]);
    scores[j] = tree_sum16(acc) * scale;
    mx = std::max(mx, scores[j]);
  }
  float part[16] = {0.f};
  int64_t j = 0;
  for (; j + 16 <= len; j += 16)
    for (int l = 0; l < 16; ++l) {
      scores[j + l] = exp_approx(scores[j + l] - mx);
      part[l] += scores[j + l];
    }
  for (int l = 0; j + l < len; ++l) {
    scores[j + l] = exp_approx(scores[j + l] - mx);
    part[l] += scores[j + l];
  }
  std::fill(out, out + d, 0.f);
  for (j = 0; j < len; ++j) {
    const T* v = values + j * d;
    const float p = scores[j];
    for (int64_t i = 0; i < d; ++i) out[i] += p * load(v[i]);
  }
  const float inv = 1.0f / tree_sum16(part);
  for (int64_t i = 0; i < d; ++i) out[i] *= inv;
}

}  // namespace

void decode_attend(const float* q, const void* keys, const void* values, int kv_dtype,
                   int64_t len, int64_t d, float scale, float* scores, float* out) {
  if (kv_dtype == kF32)
    attend(q, static_cast<const float*>(keys), static_cast<const float*>(values), len, d, scale,
           scores, out);
  else
    attend(q, static_cast<const uint16_t*>(keys), static_cast<const uint16_t*>(values), len, d,
           scale, scores, out);
}

}  // namespace PYENGINE_ISA_NS
}  // namespace pyengine
