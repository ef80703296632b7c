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
      "lora_down",
      [](uintptr_t x, int dtype, int64_t n, int64_t k, uintptr_t w, int64_t r, uintptr_t mask,
         float keep, uintptr_t u, int num_threads) {
        LoraDownArgs a{ptr<const void>(x), dtype, n, k, ptr<const float>(w), r,
                       ptr<const uint8_t>(mask), keep, ptr<float>(u)};
        py::gil_scoped_release nogil;
        lora_down(a, num_threads);
      },
      "u = keep * (x * mask) @ w.T (see csrc/lora.h).");
  m.def(
      "lora_up_add",
      [](uintptr_t out, int dtype, int64_t n, int64_t m_cols, uintptr_t u, uintptr_t w, int64_t r,
         float alpha, uintptr_t mask, int num_threads) {
        LoraUpAddArgs a{ptr<void>(out), dtype, n, m_cols, ptr<const float>(u),
                        ptr<const float>(w), r, alpha, ptr<const uint8_t>(mask)};
        py::gil_scoped_release nogil;
        lora_up_add(a, num_threads);
      },
      "out += alpha * (u @ w) * mask in place (see csrc/lora.h).");
  m.def(
      "lora_outer",
      [](uintptr_t x, int dtype, int64_t n, int64_t k, uintptr_t u, int64_t r, uintptr_t mask,
         float alpha, uintptr_t g, int num_threads) {
        LoraOuterArgs a{ptr<const void>(x), dtype, n, k, ptr<const float>(u), r,
                        ptr<const uint8_t>(mask), alpha, ptr<float>(g)};
        py::gil_scoped_release nogil;
        lora_outer(a, num_threads);
      },
      "g = alpha * u.T @ (x * mask) (see csrc/lora.h).");
}
