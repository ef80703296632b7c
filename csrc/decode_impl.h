// Attention of the query heads of one kv head over the KV cache for the decode step
// (decode.h), written
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

// For each of the `heads` query heads q[h] (sharing one kv head): out[h] = softmax(q[h]
// k^T * scale) v over positions [0, len); d a multiple of 16, at most kMaxHeadDim.  Each
// key and value row is read (and converted from bf16) once for all the heads; per head the
// operations and their order are those of one head alone.
template <typename T>
void attend(const float* q, int64_t heads, const T* keys, const T* values, int64_t len,
            int64_t d, float scale, float* scores, float* out) {
  alignas(64) float row[kMaxHeadDim];
  float mx[kMaxGroup];
  std::fill(mx, mx + heads, -INFINITY);
  for (int64_t j = 0; j < len; ++j) {
    const T* k = keys + j * d;
    for (int64_t i = 0; i < d; ++i) row[i] = load(k[i]);
    for (int64_t h = 0; h < heads; ++h) {
      const float* qh = q + h * d;
      float acc[16] = {0.f};
      for (int64_t i = 0; i < d; i += 16)
        for (int l = 0; l < 16; ++l) acc[l] += qh[i + l] * row[i + l];
      scores[h * len + j] = tree_sum16(acc) * scale;
      mx[h] = std::max(mx[h], scores[h * len + j]);
    }
  }
  float inv[kMaxGroup];
  for (int64_t h = 0; h < heads; ++h) {
    float* sh = scores + h * len;
    float part[16] = {0.f};
    int64_t j = 0;
    for (; j + 16 <= len; j += 16)
      for (int l = 0; l < 16; ++l) {
        sh[j + l] = exp_approx(sh[j + l] - mx[h]);
        part[l] += sh[j + l];
      }
    for (int l = 0; j + l < len; ++l) {
      sh[j + l] = exp_approx(sh[j + l] - mx[h]);
      part[l] += sh[j + l];
    }
    inv[h] = 1.0f / tree_sum16(part);
  }
  std::fill(out, out + heads * d, 0.f);
  for (int64_t j = 0; j < len; ++j) {
    const T* v = values + j * d;
    for (int64_t i = 0; i < d; ++i) row[i] = load(v[i]);
    for (int64_t h = 0; h < heads; ++h) {
      const float p = scores[h * len + j];
      float* oh = out + h * d;
      for (int64_t i = 0; i < d; ++i) oh[i] += p * row[i];
    }
  }
  for (int64_t h = 0; h < heads; ++h)
    for (int64_t i = 0; i < d; ++i) out[h * d + i] *= inv[h];
}

}  // namespace

void decode_attend(const float* q, int64_t heads, const void* keys, const void* values,
                   int kv_dtype, int64_t len, int64_t d, float scale, float* scores, float* out) {
  if (kv_dtype == kF32)
    attend(q, heads, static_cast<const float*>(keys), static_cast<const float*>(values), len, d,
           scale, scores, out);
  else
    attend(q, heads, static_cast<const uint16_t*>(keys), static_cast<const uint16_t*>(values),
           len, d, scale, scores, out);
}

}  // namespace PYENGINE_ISA_NS
}  // namespace pyengine
