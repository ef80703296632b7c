"""Weight-only quantized matmul: y = x @ dequant(W).T + bias, W a QuantizedWeight.

x [..., K] fp32 or bf16; W [N, K] in q8_0 / q4_0 / nf4 (pyengine.quant); bias [N]; y
[..., N] in x's dtype.  Backends:
  ref    dequantize to fp32 + F.linear (the spec; exact weights, fp32 math).
  cpu    decode-sized inputs (fewer than GEMM_MIN_ROWS rows), and fp32 x without AMX: C++
         (csrc/quant.h), x quantized per block to int8 (the llama.cpp approach), integer dot
         products (AVX-512 VNNI), fp32 scale math; error vs ref: the int8 rounding of x
         (~0.4% of each block's absmax) and, for nf4, int8 code values.
         fp32 x with more rows (prefill) on AMX: C++ (csrc/quant_amx.cpp), W dequantized a
         panel of rows at a time into a cache-resident bf16 buffer, x rounded to bf16, AMX
         bf16 tile products, fp32 sums and output; error vs ref: the bf16 rounding of x and
         W (2^-9 of each element: more exact in x than the int8 kernel), no [N, K] buffer.
         bf16 x with more rows (training): W dequantized in C++ to bf16 (bit-identical to
         dequantize().to(bfloat16)) + torch's bf16 GEMM (AMX), i.e. exactly plain torch on
         the dequantized weight.  The dequantized weight is a transient [N, K] buffer.
  triton dequantize-in-kernel + tl.dot (pyengine.kernels.quant_matmul).
Backward (for QLoRA: W frozen): grad_x = dy @ dequant(W).  cpu: W dequantized once in C++
to dy's dtype, one torch GEMM; ref / triton: W dequantized in torch in row chunks, fp32
accumulation.  Floors: the int8 GEMV reads the weight bytes once (N*K*bits/8 + scales);
the dequantize reads those and writes 2 (bf16) or 4 (fp32) bytes a weight, then the GEMM
does 2*M*N*K flops at the bf16/fp32 GEMM rate.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from pyengine import _ext
from pyengine.backends import register_op, resolve
from pyengine.quant import FORMATS, QuantizedWeight, dequantize_rows

OP = "quant_matmul"
register_op(OP, ("ref", "cpu", "triton"))
FMT_CODES = {name: spec.code for name, spec in FORMATS.items()}  # fmt of pyengine._C
X_DTYPES = (torch.float32, torch.bfloat16)
DEQUANT_CHUNK_BYTES = 16 << 20  # fp32 weight rows dequantized at a time in backward (torch)
# x with at least this many rows takes a GEMM path: bf16 x dequantize + torch's bf16 GEMM
# (2048 x 2048, 2 threads: the int8 kernel wins at 64 rows, the GEMM at 96 and up; see
# benchmarks/RESULTS_qlora.md); fp32 x the AMX kernel (1B-model shapes, 2 threads: it
# ties the int8 kernel at 32-64 rows and is 1.5-3x faster at 128-512).
GEMM_MIN_ROWS = 96


def reference_quant_matmul(x: Tensor, qweight: QuantizedWeight, bias: Tensor | None = None):
    """The spec: fp32 F.linear on the dequantized weight, cast back to x's dtype."""
    b = None if bias is None else bias.float()
    return F.linear(x.float(), qweight.dequantize(), b).to(x.dtype)


# --------------------------------------------------------------------------- backends
def dequantize_cpu(qs: Tensor, scales: Tensor, fmt: str, k: int, dtype: torch.dtype) -> Tensor:
    """dequant(W) [N, k] in dtype (fp32 / bf16) by the C++ kernel: the bits of
    dequantize_rows(...).to(dtype), threaded over rows."""
    n = qs.shape[0]
    w = torch.empty(n, k, dtype=dtype)
    _ext._C.quant_dequantize(FMT_CODES[fmt], qs.data_ptr(), scales.data_ptr(), n, k, 0, n,
                             w.data_ptr(), _ext.dtype_code(w), _ext.num_threads())
    return w


def _cpu(x2, qs, scales, fmt, bias):
    gemm = x2.shape[0] >= GEMM_MIN_ROWS
    if gemm and x2.dtype == torch.bfloat16:
        w = dequantize_cpu(qs, scales, fmt, x2.shape[1], x2.dtype)
        return F.linear(x2, w, None if bias is None else bias.to(x2.dtype))
    n = qs.shape[0]
    y = torch.empty(x2.shape[0], n, dtype=x2.dtype)
    bias32 = None if bias is None else bias.float().contiguous()
    if gemm and _ext._C.amx_active():  # fp32 x: the AMX bf16 kernel
        _ext._C.quant_matmul_amx(FMT_CODES[fmt], qs.data_ptr(), scales.data_ptr(), n,
                                 x2.shape[1], x2.data_ptr(), x2.shape[0], _ext.ptr(bias32),
                                 y.data_ptr(), _ext.num_threads())
        return y
    _ext._C.quant_matmul(FMT_CODES[fmt], qs.data_ptr(), scales.data_ptr(), n, x2.shape[1],
                         x2.data_ptr(), _ext.dtype_code(x2), x2.shape[0], _ext.ptr(bias32),
                         y.data_ptr(), _ext.num_threads())
    return y


def _triton(x2, qs, scales, fmt, bias):
    from pyengine.kernels.quant_matmul import quant_matmul as tq
    return tq(x2, qs, scales, fmt, bias)


def _ref(x2, qs, scales, fmt, bias):
    w = dequantize_rows(fmt, qs, scales, x2.shape[1])
    return F.linear(x2.float(), w, None if bias is None else bias.float()).to(x2.dtype)


BACKENDS = {"cpu": _cpu, "triton": _triton, "ref": _ref}


# --------------------------------------------------------------------------- custom ops
@torch.library.custom_op("pyengine::quant_matmul", mutates_args=())
def _qmm(x: Tensor, qs: Tensor, scales: Tensor, fmt: str, bias: Optional[Tensor],
         backend: str) -> Tensor:
    """x [M, K] contiguous -> [M, N]."""
    return BACKENDS[backend](x, qs, scales, fmt, bias)


@_qmm.register_fake
def _(x, qs, scales, fmt, bias, backend):
    return x.new_empty(x.shape[0], qs.shape[0])


@torch.library.custom_op("pyengine::quant_dequantize", mutates_args=())
def _dequant_cpu(qs: Tensor, scales: Tensor, fmt: str, k: int, dtype: torch.dtype) -> Tensor:
    """dequant(W) [N, k] in dtype by the C++ kernel (the cpu backward's weight)."""
    return dequantize_cpu(qs, scales, fmt, k, dtype)


@_dequant_cpu.register_fake
def _(qs, scales, fmt, k, dtype):
    return qs.new_empty(qs.shape[0], k, dtype=dtype)


@torch.library.custom_op("pyengine::quant_matmul_grad_x", mutates_args=())
def _qmm_grad_x(dy: Tensor, qs: Tensor, scales: Tensor, fmt: str, k: int) -> Tensor:
    """dy [M, N] @ dequant(W) [N, K] -> [M, K] (fp32 accumulate), W dequantized in row chunks."""
    n = qs.shape[0]
    rows = max(1, DEQUANT_CHUNK_BYTES // (4 * k))
    gx = torch.zeros(dy.shape[0], k, dtype=torch.float32, device=dy.device)
    dy32 = dy.float()
    for s in range(0, n, rows):
        e = min(n, s + rows)
        gx.addmm_(dy32[:, s:e], dequantize_rows(fmt, qs[s:e], scales[s:e], k))
    return gx.to(dy.dtype)


@_qmm_grad_x.register_fake
def _(dy, qs, scales, fmt, k):
    return dy.new_empty(dy.shape[0], k)


def _setup_context(ctx, inputs, output):
    x, qs, scales, fmt, bias, backend = inputs
    ctx.fmt, ctx.k, ctx.has_bias, ctx.backend = fmt, x.shape[1], bias is not None, backend
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.save_for_backward(qs, scales)


def _qmm_grad(ctx, dy):
    qs, scales = ctx.saved_tensors
    gx = None
    if ctx.needs_input_grad[0] and ctx.backend == "cpu":  # one dequantize, one GEMM in dy's dtype
        gx = dy @ _dequant_cpu(qs, scales, ctx.fmt, ctx.k, dy.dtype)
    elif ctx.needs_input_grad[0]:
        gx = _qmm_grad_x(dy.contiguous(), qs, scales, ctx.fmt, ctx.k)
    gb = None
    if ctx.has_bias and ctx.needs_input_grad[4]:
        gb = dy.sum(0, dtype=torch.float32).to(ctx.bias_dtype)
    return gx, None, None, None, gb, None


_qmm.register_autograd(_qmm_grad, setup_context=_setup_context)


# --------------------------------------------------------------------------- public API
def _validate(x, qweight, bias):
    name = "quant_matmul"
    if not isinstance(qweight, QuantizedWeight):
        raise TypeError(f"{name}: qweight must be a pyengine.quant.QuantizedWeight, got "
                        f"{type(qweight).__name__}")
    if qweight.fmt not in FORMATS:
        raise ValueError(f"{name}: unknown format {qweight.fmt!r}")
    n, k = qweight.shape
    if x.dtype not in X_DTYPES:
        raise TypeError(f"{name}: x dtype {x.dtype} not supported (float32, bfloat16)")
    if x.dim() < 1 or x.shape[-1] != k:
        raise ValueError(f"{name}: x {tuple(x.shape)} does not end in K = {k} of the weight "
                         f"{qweight.shape}")
    if x.device != qweight.device:
        raise ValueError(f"{name}: x is on {x.device}, weight on {qweight.device}")
    if bias is not None:
        if tuple(bias.shape) != (n,) or not bias.dtype.is_floating_point:
            raise ValueError(f"{name}: bias must be a float [{n}] tensor, got "
                             f"{tuple(bias.shape)} {bias.dtype}")
        if bias.device != x.device:
            raise ValueError(f"{name}: bias is on {bias.device}, x on {x.device}")


def quant_matmul(x: Tensor, qweight: QuantizedWeight, *, bias: Tensor | None = None,
                 backend: str | None = None) -> Tensor:
    """y = x @ dequant(qweight).T + bias, in x's dtype.  Differentiable in x (and bias)."""
    _validate(x, qweight, bias)
    chosen = resolve(OP, backend, x.device)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    args = (x2, qweight.qs.contiguous(), qweight.scales.contiguous(), qweight.fmt,
            None if bias is None else bias.contiguous())
    needs_grad = torch.is_grad_enabled() and (
        x.requires_grad or (bias is not None and bias.requires_grad))
    if needs_grad or torch.compiler.is_compiling():
        y = _qmm(*args, chosen)
    else:  # eager inference: skip the dispatcher (~10 us a call, matters at decode)
        y = BACKENDS[chosen](*args)
    return y.reshape(*lead, qweight.shape[0])
