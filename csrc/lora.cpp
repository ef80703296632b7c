// Dispatch + threading for the LoRA skinny products; also their scalar build.
#define PYENGINE_ISA_NS scalar
#include "lora_impl.h"

#include "cpu_features.h"
#include "parallel.h"

namespace pyengine {

template <typename Args>
using RangeFn = void (*)(const Args&, int64_t, int64_t);

template <typename Args>
static RangeFn<Args> pick(RangeFn<Args> s, RangeFn<Args> a2, RangeFn<Args> a512) {
  switch (active_isa()) {
    case Isa::kAvx512: return a512;
    case Isa::kAvx2: return a2;
    default: return s;
  }
}

void lora_down(const LoraDownArgs& a, int num_threads) {
  auto fn = pick<LoraDownArgs>(scalar::lora_down_rows, avx2::lora_down_rows,
                               avx512::lora_down_rows);
  parallel_for(a.n, num_threads, 16, [&](int64_t b, int64_t e) { fn(a, b, e); });
}

void lora_up_add(const LoraUpAddArgs& a, int num_threads) {
  auto fn = pick<LoraUpAddArgs>(scalar::lora_up_add_rows, avx2::lora_up_add_rows,
                                avx512::lora_up_add_rows);
  parallel_for(a.n, num_threads, 16, [&](int64_t b, int64_t e) { fn(a, b, e); });
}

void lora_outer(const LoraOuterArgs& a, int num_threads) {
  auto fn = pick<LoraOuterArgs>(scalar::lora_outer_cols, avx2::lora_outer_cols,
                                avx512::lora_outer_cols);
  // threads split the K columns (each owns its slice of g: no reduction across threads)
  const int64_t blocks = (a.k + 63) / 64;
  parallel_for(blocks, num_threads, 1, [&](int64_t b, int64_t e) {
    fn(a, b * 64, e * 64 < a.k ? e * 64 : a.k);
  });
}

}  // namespace pyengine
