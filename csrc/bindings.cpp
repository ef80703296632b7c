// pybind11 module pyengine._C: every binding in one place.  Arguments are raw data
// pointers (Python passes tensor.data_ptr()) plus sizes; Python validates shapes,
// dtypes and contiguity before calling (pyengine/_ext.py).  The GIL is released while
// kernels run.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <vector>

#include "attention.h"
#include "cpu_features.h"
#include "cross_entropy.h"
#include "decode.h"
#include "lora_gather.h"
#include "lowrank_rows.h"
#include "norms.h"
#include "rope.h"
#include "swiglu.h"
#include "quant.h"

namespace py = pybind11;
using namespace pyengine;

template <typename T>
static T* ptr(uintptr_t p) { return reinterpret_cast<T*>(p); }

// (fmt, qs, scales, n, k, bias) -> a quantized linear of the decode step
using LinearArgs = std::tuple<int, uintptr_t, uintptr_t, int64_t, int64_t, uintptr_t>;
static DecodeLinear decode_linear(const LinearArgs& a) {
  return {{std::get<0>(a), ptr<const uint8_t>(std::get<1>(a)),
           ptr<const uint16_t>(std::get<2>(a)), std::get<3>(a), std::get<4>(a)},
          ptr<const float>(std::get<5>(a))};
}

// (a, b, n_adapters, rank) -> one linear's LoRA stacks of the decode step
using LoraArgs = std::tuple<uintptr_t, uintptr_t, int64_t, int64_t>;
static DecodeLora decode_lora(const LoraArgs& a) {
  return {ptr<const float>(std::get<0>(a)), ptr<const float>(std::get<1>(a)), std::get<2>(a),
          std::get<3>(a)};
}

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
  m.def("has_amx", &has_amx, "AMX bf16 tiles usable (CPU, OS, process permission).");
  m.def("amx_active", &amx_active, "AMX tiles used for bf16 attention now.");
  m.def("set_amx", &set_amx, "Allow (default) or forbid the AMX path (tests).");

  m.def(
      "ce_rows",
      [](uintptr_t logits, int dtype, int64_t n_rows, int64_t vocab, int64_t ld, uintptr_t target,
         int64_t ignore_index, float label_smoothing, float z_loss, float softcap, float scale,
         uintptr_t row_scale, uintptr_t loss, uintptr_t lse, bool write_grad, int num_threads) {
        CeArgs a{ptr<void>(logits), dtype, n_rows, vocab, ld, ptr<const int64_t>(target),
                 ignore_index, label_smoothing, z_loss, softcap, scale,
                 ptr<const float>(row_scale), ptr<void>(loss), ptr<void>(lse), write_grad};
        py::gil_scoped_release nogil;
        ce_rows(a, num_threads);
      },
      "Cross-entropy over logits rows in place (see csrc/cross_entropy.h).");
  m.def(
      "accumulate_f32",
      [](uintptr_t acc, uintptr_t src, int src_dtype, int64_t n, int num_threads) {
        py::gil_scoped_release nogil;
        accumulate_f32(ptr<float>(acc), ptr<const void>(src), src_dtype, n, num_threads);
      },
      "acc[i] += src[i] (src fp32/bf16/fp16) into an fp32 accumulator.");
  m.def(
      "ce_keep_columns",
      [](uintptr_t grad, int dtype, int64_t rows, int64_t vocab, int64_t ld, uintptr_t target,
         int64_t ignore_index, double thr, uintptr_t cols, int num_threads) {
        py::gil_scoped_release nogil;
        return ce_keep_columns(ptr<const void>(grad), dtype, rows, vocab, ld,
                               ptr<const int64_t>(target), ignore_index, thr,
                               ptr<int64_t>(cols), num_threads);
      },
      "Columns of a gradient block kept by the filter (see csrc/cross_entropy.h).");
  m.def(
      "accumulate_rows_f32",
      [](uintptr_t acc, uintptr_t idx, uintptr_t src, int src_dtype, int64_t k, int64_t n,
         int num_threads) {
        py::gil_scoped_release nogil;
        accumulate_rows_f32(ptr<float>(acc), ptr<const int64_t>(idx), ptr<const void>(src),
                            src_dtype, k, n, num_threads);
      },
      "acc[idx[r]] += src[r] row by row into an fp32 accumulator.");

  m.def(
      "attention_forward",
      [](uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t key_mask, uintptr_t o, uintptr_t lse,
         int dtype, int64_t B, int64_t Hq, int64_t Hkv, int64_t S, int64_t D, float scale,
         bool causal, int num_threads) {
        AttnArgs a{dtype, B, Hq, Hkv, S, D, scale, causal, ptr<const uint8_t>(key_mask),
                   ptr<const void>(q), ptr<const void>(k), ptr<const void>(v), ptr<void>(o),
                   ptr<float>(lse), nullptr, nullptr, nullptr, nullptr};
        py::gil_scoped_release nogil;
        attention_forward(a, num_threads);
      },
      "o and the row logsumexp of softmax(scale q k^T + mask) v (see csrc/attention.h).");
  m.def(
      "attention_backward",
      [](uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t key_mask, uintptr_t o, uintptr_t lse,
         uintptr_t dout, uintptr_t dq, uintptr_t dk, uintptr_t dv, int dtype, int64_t B,
         int64_t Hq, int64_t Hkv, int64_t S, int64_t D, float scale, bool causal,
         int num_threads) {
        AttnArgs a{dtype, B, Hq, Hkv, S, D, scale, causal, ptr<const uint8_t>(key_mask),
                   ptr<const void>(q), ptr<const void>(k), ptr<const void>(v), ptr<void>(o),
                   ptr<float>(lse), ptr<const void>(dout), ptr<void>(dq), ptr<void>(dk),
                   ptr<void>(dv)};
        py::gil_scoped_release nogil;
        attention_backward(a, num_threads);
      },
      "dq, dk, dv of attention, probabilities recomputed from lse (see csrc/attention.h).");

  m.def(
      "swiglu_forward",
      [](uintptr_t g, uintptr_t u, uintptr_t h, int dtype, int64_t n, int num_threads) {
        SwigluArgs a{dtype, n, ptr<const void>(g), ptr<const void>(u), nullptr, ptr<void>(h),
                     nullptr, nullptr};
        py::gil_scoped_release nogil;
        swiglu_forward(a, num_threads);
      },
      "h = silu(g) * u over n contiguous elements (see csrc/swiglu.h).");
  m.def(
      "swiglu_backward",
      [](uintptr_t dh, uintptr_t g, uintptr_t u, uintptr_t dg, uintptr_t du, uintptr_t h,
         int dtype, int64_t n, int num_threads) {
        SwigluArgs a{dtype, n, ptr<const void>(g), ptr<const void>(u), ptr<const void>(dh),
                     ptr<void>(h), ptr<void>(dg), ptr<void>(du)};
        py::gil_scoped_release nogil;
        swiglu_backward(a, num_threads);
      },
      "dg, du (and h when its pointer is non-zero) of h = silu(g) * u (see csrc/swiglu.h).");
  m.def(
      "lora_swiglu_forward",
      [](int dtype, int64_t n_rows, int64_t inter, int64_t rg, int64_t ru, int64_t rd,
         float scale, uintptr_t g, uintptr_t u, uintptr_t h, uintptr_t xa, uintptr_t bg_t,
         uintptr_t bu_t, uintptr_t a_down, uintptr_t ha, int num_threads) {
        LoraSwigluArgs a{};
        a.dtype = dtype; a.n_rows = n_rows; a.inter = inter;
        a.rg = rg; a.ru = ru; a.rd = rd; a.scale = scale;
        a.g = ptr<void>(g); a.u = ptr<void>(u); a.h = ptr<void>(h);
        a.xa = ptr<const float>(xa); a.bg_t = ptr<const float>(bg_t);
        a.bu_t = ptr<const float>(bu_t); a.a_down = ptr<const float>(a_down);
        a.ha = ptr<float>(ha);
        py::gil_scoped_release nogil;
        lora_swiglu_forward(a, num_threads);
      },
      "LoRA-fused SwiGLU forward of lora_mlp (see csrc/swiglu.h).");
  m.def(
      "lora_swiglu_backward",
      [](int dtype, int64_t n_rows, int64_t inter, int64_t rg, int64_t ru, int64_t rd,
         float scale, uintptr_t g, uintptr_t u, uintptr_t dh, uintptr_t du, uintptr_t xa,
         uintptr_t bg_t, uintptr_t bu_t, uintptr_t a_down, uintptr_t p_down, uintptr_t p_gu,
         uintptr_t d_a_down, uintptr_t d_bg_t, uintptr_t d_bu_t, int num_threads) {
        LoraSwigluArgs a{};
        a.dtype = dtype; a.n_rows = n_rows; a.inter = inter;
        a.rg = rg; a.ru = ru; a.rd = rd; a.scale = scale;
        a.g = ptr<void>(g); a.u = ptr<void>(u); a.dh = ptr<void>(dh); a.du = ptr<void>(du);
        a.xa = ptr<const float>(xa); a.bg_t = ptr<const float>(bg_t);
        a.bu_t = ptr<const float>(bu_t); a.a_down = ptr<const float>(a_down);
        a.p_down = ptr<const float>(p_down); a.p_gu = ptr<float>(p_gu);
        a.d_a_down = ptr<float>(d_a_down); a.d_bg_t = ptr<float>(d_bg_t);
        a.d_bu_t = ptr<float>(d_bu_t);
        py::gil_scoped_release nogil;
        lora_swiglu_backward(a, num_threads);
      },
      "LoRA-fused SwiGLU backward of lora_mlp (see csrc/swiglu.h).");
  m.def(
      "lowrank_rows",
      [](int dtype, int64_t n_rows, int64_t cols, uintptr_t src, uintptr_t src_mask,
         int64_t proj_rank, uintptr_t proj_w, uintptr_t proj_out, float scale,
         int64_t grad_rank, uintptr_t grad_coef, uintptr_t grad_out, int64_t add_rank,
         uintptr_t add_coef, uintptr_t add_w, float alpha, uintptr_t dst, int64_t dst_cols,
         uintptr_t dst_mask, int num_threads) {
        LowRankRowsArgs a{dtype, n_rows, cols, ptr<const void>(src), ptr<const uint8_t>(src_mask),
                          proj_rank, ptr<const float>(proj_w), ptr<float>(proj_out), scale,
                          grad_rank, ptr<const float>(grad_coef), ptr<float>(grad_out), add_rank,
                          ptr<const float>(add_coef), ptr<const float>(add_w), alpha,
                          ptr<void>(dst), dst_cols, ptr<const uint8_t>(dst_mask)};
        py::gil_scoped_release nogil;
        lowrank_rows(a, num_threads);
      },
      "The low-rank engine: proj / grad / add fused into one pass over the rows "
      "(see csrc/lowrank_rows.h).");

  m.def(
      "lora_gather_add",
      [](uintptr_t x, int64_t rows, int64_t k, uintptr_t idx, uintptr_t a, uintptr_t b,
         int64_t n_adapters, int64_t rank, int64_t n, uintptr_t y, int num_threads) {
        py::gil_scoped_release nogil;
        lora_gather_add(ptr<const float>(x), rows, k, ptr<const int64_t>(idx), ptr<const float>(a),
                        ptr<const float>(b), n_adapters, rank, n, ptr<float>(y), num_threads);
      },
      "y[r] += b[idx[r]] @ (a[idx[r]] @ x[r]) for rows with idx[r] >= 0, in place "
      "(see csrc/lora_gather.h).");

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
  m.def(
      "quant_matmul_amx",
      [](int fmt, uintptr_t qs, uintptr_t scales, int64_t n, int64_t k, uintptr_t x, int64_t m,
         uintptr_t bias, uintptr_t y, int num_threads) {
        if (!amx_active()) throw std::runtime_error("quant_matmul_amx: AMX is not active");
        QuantWeights w{fmt, ptr<const uint8_t>(qs), ptr<const uint16_t>(scales), n, k};
        py::gil_scoped_release nogil;
        quant_matmul_amx(w, ptr<const float>(x), m, ptr<const float>(bias), ptr<float>(y),
                         num_threads);
      },
      "y[m, n] fp32 = bf16(x[m, k] fp32) @ bf16(dequant(qs, scales)).T + bias on AMX tiles "
      "(the prefill GEMM; see csrc/quant_amx.cpp).");
  m.def(
      "quant_dequantize",
      [](int fmt, uintptr_t qs, uintptr_t scales, int64_t n, int64_t k, int64_t row_begin,
         int64_t row_end, uintptr_t out, int out_dtype, int num_threads) {
        QuantWeights w{fmt, ptr<const uint8_t>(qs), ptr<const uint16_t>(scales), n, k};
        py::gil_scoped_release nogil;
        quant_dequantize(w, row_begin, row_end, ptr<void>(out), out_dtype, num_threads);
      },
      "out[rows, k] (fp32 / bf16) = dequant(qs, scales) rows [row_begin, row_end) (csrc/quant.h).");
  m.def(
      "quant_formats",
      [] {
        py::dict out;
        for (int i = 0; i < kNumQuantFmts; ++i) {
          const QuantFormat& f = kQuantFormats[i];
          std::vector<float> book(f.codebook, f.codebook + f.codebook_size);
          out[f.name] = py::make_tuple(i, f.block, f.bits, f.is_signed, f.zero, book);
        }
        return out;
      },
      "The compiled format table {name: (code, block, bits, signed, zero, codebook)}: "
      "pyengine/quant_formats.py as of the build.");
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
  m.def(
      "norm_forward",
      [](bool layer, int dtype, int64_t rows, int64_t cols, float eps, uintptr_t x,
         uintptr_t residual, uintptr_t weight, uintptr_t bias, uintptr_t y, uintptr_t s,
         uintptr_t mean, uintptr_t rstd, int num_threads) {
        NormArgs a{};
        a.dtype = dtype; a.rows = rows; a.cols = cols; a.eps = eps;
        a.x = ptr<const void>(x); a.residual = ptr<const void>(residual);
        a.weight = ptr<const void>(weight); a.bias = ptr<const void>(bias);
        a.y = ptr<void>(y); a.s = ptr<void>(s); a.mean = ptr<float>(mean);
        a.rstd = ptr<float>(rstd);
        py::gil_scoped_release nogil;
        if (layer) layer_norm_forward(a, num_threads);
        else rms_norm_forward(a, num_threads);
      },
      "RMSNorm / LayerNorm (layer=True) forward with optional residual (see csrc/norms.h).");
  m.def(
      "norm_backward",
      [](bool layer, int dtype, int64_t rows, int64_t cols, uintptr_t weight, uintptr_t s,
         uintptr_t mean, uintptr_t rstd, uintptr_t dy, uintptr_t ds, uintptr_t dx,
         uintptr_t dweight, uintptr_t dbias, int num_threads) {
        NormArgs a{};
        a.dtype = dtype; a.rows = rows; a.cols = cols;
        a.weight = ptr<const void>(weight); a.s = ptr<void>(s); a.mean = ptr<float>(mean);
        a.rstd = ptr<float>(rstd); a.dy = ptr<const void>(dy); a.ds = ptr<const void>(ds);
        a.dx = ptr<void>(dx); a.dweight = ptr<float>(dweight); a.dbias = ptr<float>(dbias);
        py::gil_scoped_release nogil;
        if (layer) layer_norm_backward(a, num_threads);
        else rms_norm_backward(a, num_threads);
      },
      "RMSNorm / LayerNorm (layer=True) backward; dweight, dbias accumulated (see csrc/norms.h).");
  m.def(
      "rope",
      [](bool backward, int dtype, int64_t batch, int64_t seq, int64_t dim, int64_t cos_sb,
         uintptr_t cos, uintptr_t sin, uintptr_t q, uintptr_t q_out, int64_t hq,
         std::array<int64_t, 6> q_strides, uintptr_t k, uintptr_t k_out, int64_t hk,
         std::array<int64_t, 6> k_strides, int num_threads) {
        // strides: batch, head, position of the input, then of the output
        const auto& qs = q_strides;
        const auto& ks = k_strides;
        RopeArgs a{dtype, batch, seq, dim, cos_sb, ptr<const void>(cos), ptr<const void>(sin),
                   {ptr<const void>(q), ptr<void>(q_out), hq, qs[0], qs[1], qs[2], qs[3], qs[4],
                    qs[5]},
                   {ptr<const void>(k), ptr<void>(k_out), hk, ks[0], ks[1], ks[2], ks[3], ks[4],
                    ks[5]}};
        py::gil_scoped_release nogil;
        if (backward) rope_backward(a, num_threads);
        else rope_forward(a, num_threads);
      },
      "RoPE on q and k in one pass, forward or backward (see csrc/rope.h).");

  py::class_<DecodeStep>(m, "DecodeStep",
                         "One step of R token rows through a whole quantized model (csrc/decode.h).")
      .def(py::init([](std::tuple<int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,
                                  int64_t, float, int> c,
                       const std::vector<std::tuple<uintptr_t, LinearArgs, LinearArgs, uintptr_t,
                                                    LinearArgs, LinearArgs>>& layers,
                       uintptr_t embed, uintptr_t final_norm, const LinearArgs& head,
                       uintptr_t kv_cache, uintptr_t rope, int64_t max_rows) {
             const auto [hidden, inter, nh, nkv, d, vocab, max_len, slots, eps, kv_dtype] = c;
             std::vector<DecodeLayer> ls;
             for (const auto& [an, qkv, o, mn, gu, down] : layers)
               ls.push_back({ptr<const float>(an), decode_linear(qkv), decode_linear(o),
                             ptr<const float>(mn), decode_linear(gu), decode_linear(down)});
             return std::make_unique<DecodeStep>(
                 DecodeConfig{hidden, inter, nh, nkv, d, vocab, max_len, slots, eps, kv_dtype},
                 std::move(ls), ptr<const float>(embed), ptr<const float>(final_norm),
                 decode_linear(head), ptr<void>(kv_cache), ptr<const float>(rope), max_rows);
           }),
           "config (hidden, intermediate, n_heads, n_kv_heads, head_dim, vocab, max_len, slots, "
           "eps, kv_dtype), layers [(attn_norm, qkv, o, mlp_norm, gate_up, down)] with linears "
           "(fmt, qs, scales, n, k, bias), embed, final_norm, head, kv_cache, rope: data "
           "pointers the caller keeps alive; max_rows: the most rows of one call.")
      .def(
          "set_lora",
          [](DecodeStep& s, const std::vector<std::array<LoraArgs, 4>>& layers) {
            std::vector<DecodeLayerLora> ls;
            for (const auto& l : layers)
              ls.push_back({decode_lora(l[0]), decode_lora(l[1]), decode_lora(l[2]),
                            decode_lora(l[3])});
            s.set_lora(std::move(ls));
          },
          "Per layer [qkv, o, gate_up, down] of (a, b, n_adapters, rank) (a, b: fp32 stack "
          "pointers the caller keeps alive); [] = no LoRA.")
      .def(
          "run_rows",
          [](DecodeStep& s, uintptr_t tokens, uintptr_t slots, uintptr_t positions,
             uintptr_t adapters, int64_t rows, uintptr_t logit_rows, int64_t n_out,
             int64_t gemm_from, uintptr_t logits, int num_threads) {
            const DecodeRows r{ptr<const int64_t>(tokens), ptr<const int64_t>(slots),
                               ptr<const int64_t>(positions), ptr<const int64_t>(adapters), rows,
                               ptr<const int64_t>(logit_rows), n_out, gemm_from};
            py::gil_scoped_release nogil;
            s.run(r, ptr<float>(logits), num_threads);
          },
          "R rows (int64 pointers: tokens, slots, positions, adapters; rows; logit_rows, n_out; "
          "gemm_from: rows from there may take the AMX GEMM): writes their k, v to the cache and "
          "logits [n_out, vocab] (fp32).")
      .def(
          "run",
          [](DecodeStep& s, int64_t token, int64_t pos, uintptr_t logits, int num_threads) {
            const int64_t slot = 0, adapter = -1, row = 0;
            py::gil_scoped_release nogil;
            s.run({&token, &slot, &pos, &adapter, 1, &row, 1, 1}, ptr<float>(logits), num_threads);
          },
          "One token at `pos` of slot 0, no adapter: writes its k, v and logits [vocab] (fp32).");
}
