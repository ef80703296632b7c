// pybind11 module pyengine._C: every binding in one place.  Arguments are raw data
// pointers (Python passes tensor.data_ptr()) plus sizes; Python validates shapes,
// dtypes and contiguity before calling (pyengine/_ext.py).  The GIL is released while
// kernels run.
#include <pybind11/pybind11.h>

#include "cpu_features.h"
#include "cross_entropy.h"
#include "quant.h"

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
      "quant_matmul",
      [](int fmt, uintptr_t qs, uintptr_t scales, int64_t n, int64_t k, uintptr_t x, int x_dtype,
         int64_t m, uintptr_t bias, uintptr_t y, int num_threads) {
        QuantWeights w{fmt, ptr<const uint8_t>(qs), ptr<const uint16_t>(scales), n, k};
        py::gil_scoped_release nogil;
        quant_matmul(w, ptr<const void>(x), x_dtype, m, ptr<const float>(bias), ptr<void>(y),
                     num_threads);
      },
      "y[m, n] = x[m, k] @ dequant(qs, scales).T + bias (see csrc/quant.h).");
  m.def("quant_act_row_bytes", &quant_act_row_bytes,
        "Bytes of one token's quantized activations in the quant_matmul buffer layout.");
  m.def(
      "quant_quantize_activations",
      [](int fmt, uintptr_t x, int x_dtype, int64_t m, int64_t k, uintptr_t act, int num_threads) {
        py::gil_scoped_release nogil;
        quant_quantize_activations(fmt, ptr<const void>(x), x_dtype, m, k, ptr<uint8_t>(act),
                                   num_threads);
      },
      "The int8 activation buffer quant_matmul builds (64-byte aligned act; for tests).");
}
