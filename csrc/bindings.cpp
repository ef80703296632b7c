// pybind11 module pyengine._C: every binding in one place.  Arguments are raw data
// pointers (Python passes tensor.data_ptr()) plus sizes; Python validates shapes,
// dtypes and contiguity before calling (pyengine/_ext.py).  The GIL is released while
// kernels run.
#include <pybind11/pybind11.h>

#include "cpu_features.h"
#include "cross_entropy.h"
#include "lora.h"

namespace py = pybind11;
using namespace pyengine;

template <typename T>
static T* ptr(uintptr_t p) { return reinterpret_cast<T*>(p); }

PYBIND11_MODULE(_C, m) {
  m.doc() = "pyengine C++ kernels (torch-free)";

  m.def("best_isa", [] { return std::string(isa_name(best_isa())); });
  m.def("active_isa", [] { return std::string(isa_name(active_isa())); });
  m.def("set_isa_cap", [](const std::string& name) {
    if (name == "scalar") set_isa_cap(Isa::kScalar);
    else if (name == "avx2") set_isa_cap(Isa::kAvx2);
    else if (name == "avx512") set_isa_cap(Isa::kAvx512);
    else throw py::value_error("unknown ISA '" + name + "' (scalar, avx2, avx512)");
  });

  m.def(
      "ce_rows",
      [](uintptr_t logits, int dtype, int64_t n_rows, int64_t vocab, int64_t ld, uintptr_t target,
         int64_t ignore_index, float label_smoothing, float z_loss, float softcap, float scale,
         uintptr_t row_scale, uintptr_t loss, uintptr_t lse, bool write_grad, int num_threads) {
        CeArgs a{ptr<void>(logits), dtype, n_rows, vocab, ld, ptr<const int64_t>(target),
                 ignore_index, label_smoothing, z_loss, softcap, scale,
                 ptr<const float>(row_scale), ptr<float>(loss), ptr<float>(lse), write_grad};
        py::gil_scoped_release nogil;
        ce_rows(a, num_threads);
      },
      "Cross-entropy over logits rows in place (see csrc/cross_entropy.h).");

  m.def(
      "lora_down_up_add",
      [](uintptr_t x, int x_dtype, int64_t n, int64_t k, uintptr_t w_down, int64_t r,
         uintptr_t x_mask, float keep, uintptr_t u, uintptr_t out, int out_dtype, int64_t m_cols,
         uintptr_t w_up, float alpha, uintptr_t out_mask, int num_threads) {
        LoraDownArgs d{ptr<const void>(x), x_dtype, n, k, ptr<const float>(w_down), r,
                       ptr<const uint8_t>(x_mask), keep, ptr<float>(u)};
        LoraUpAddArgs up{ptr<void>(out), out_dtype, n, m_cols, ptr<const float>(u),
                         ptr<const float>(w_up), r, alpha, ptr<const uint8_t>(out_mask)};
        py::gil_scoped_release nogil;
        lora_down_up_add(d, up, num_threads);
      },
      "u = keep * (x * x_mask) @ w_down.T, then out += alpha * (u @ w_up) * out_mask; "
      "one parallel pass over the rows (see csrc/lora.h).");
  m.def(
      "lora_outer2",
      [](uintptr_t x1, int dtype1, int64_t k1, uintptr_t u1, uintptr_t mask1, float alpha1,
         uintptr_t g1, uintptr_t x2, int dtype2, int64_t k2, uintptr_t u2, float alpha2,
         uintptr_t g2, int64_t n, int64_t r, int num_threads) {
        LoraOuterArgs a{ptr<const void>(x1), dtype1, n, k1, ptr<const float>(u1), r,
                        ptr<const uint8_t>(mask1), alpha1, ptr<float>(g1)};
        LoraOuterArgs b{ptr<const void>(x2), dtype2, x2 ? n : 0, k2, ptr<const float>(u2), r,
                        nullptr, alpha2, ptr<float>(g2)};
        py::gil_scoped_release nogil;
        lora_outer2(a, b, num_threads);
      },
      "g1 = alpha1 * u1.T @ (x1 * mask1) and g2 = alpha2 * u2.T @ x2 in one parallel "
      "region (x2 = 0: only g1) (see csrc/lora.h).");
}
