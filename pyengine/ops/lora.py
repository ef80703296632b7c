"""LoRA linear: a frozen base linear plus a low-rank update, forward and backward in one op.

    y = x @ W.T + bias + scale * (dropout(x) @ A.T) @ B.T

x [..., in] (fp32 or bf16), W [out, in] frozen (same dtype as x), bias [out] optional,
A [r, in] and B [out, r] the adapters (fp32 or bf16; bf16 base with fp32 adapters is the
usual mixed setup).  QLoRA: W may be a pyengine.quant.QuantizedWeight (q8_0 / q4_0 / nf4);
the same op then runs the base term x @ dequant(W).T + bias with quant_matmul's kernel for
the backend and dx = dy @ dequant(W) as quant_matmul's backward does (`base_linear`,
`base_grad_x`); the low-rank passes add into those tensors, as for a dense W.
The low-rank path runs in ct = promote(x.dtype, A.dtype) with fp32 accumulation; y and dx come back in x's dtype.  B @ A is never formed.

Forward:  y = x @ W.T (+ bias)                   torch GEMM (the floor)
          u = keep * (x * mask) @ A.T,           [N, r], saved for backward;
          y += scale * u @ B.T                   one low-rank pass over x and y
Backward: dx = dy @ W                            torch GEMM (W frozen: no dW GEMM)
          v = dy @ B,  dB = scale * dy.T @ u,    one low-rank pass over dy and dx
          dx += scale * keep * (v @ A) * mask
          dA = scale * keep * v.T @ (x * mask)   one low-rank pass over x
mask is the dropout keep-mask (bool [N, in], only when dropout_p > 0; keep = 1/(1-p));
backward saves x, u (and the mask), never a dropped-out copy of x.

Autocast: inside torch.autocast the frozen base (x, W, bias) runs as F.linear's inputs
would (in the autocast dtype), the adapters do not: they stay fp32 master weights, run the
low-rank math in fp32 and get fp32 gradients; y comes back in the autocast dtype, as
F.linear's would (`register_base_autocast`, also used by pyengine.ops.lora_mlp).  x and
bias are cast before the op; a dense W reaches the op in its own dtype and is cast to x's
where each GEMM uses it (`base_linear`, `base_grad_x`): backward keeps the model's fp32 W,
not a bf16 copy of it (F.linear's autograd keeps that copy), and re-casts it into a buffer
freed after dx's GEMM: the same bits, one [out, in] bf16 tensor less per layer kept.

Backends: "ref" (plain PyTorch autograd, upcast to fp32: the spec), "cpu" (the low-rank
passes in C++, `low_rank_pass` -> csrc/lowrank_rows.h, the engine lora_mlp uses too; the
GEMMs torch), "triton" (low_rank_pass's proj / add in pyengine.kernels.lora).
Floor (N tokens, r << in, out): 2 GEMMs of 2*N*in*out flops (x@W.T, dy@W) plus
~6 skinny products of 2*N*r*(in|out) flops that are bound by memory: the three passes
read x twice and dy once and read+write y and dx once (~ N*(4*in + 3*out) elements).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from pyengine import _ext
from pyengine.backends import register_op, resolve
from pyengine.ops.quant import BACKENDS as QUANT_BACKENDS, X_DTYPES as QUANT_X_DTYPES
from pyengine.ops.quant import _qmm_grad_x, dequantize_cpu
from pyengine.ops.swiglu import KERNEL_DTYPES
from pyengine.quant import FORMATS, QuantizedWeight

OP = "lora_linear"
register_op(OP, ("ref", "cpu", "triton"))
DTYPES = (torch.float32, torch.bfloat16, torch.float64)  # float64: for gradcheck (torch path)


def dropout_mask(x: Tensor, p: float) -> Tensor:
    """The keep-mask lora_linear uses for dropout probability p (bool, x's shape), drawn
    from torch's global generator: seed it to reproduce the mask."""
    return torch.empty(x.shape, dtype=torch.bool, device=x.device).bernoulli_(1.0 - p)


def _fp32_or_wider(t: Tensor) -> Tensor:
    return t.to(torch.promote_types(t.dtype, torch.float32))


# --------------------------------------------------------------------------- autocast
def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype torch.autocast gives F.linear on `device` here, or None outside autocast."""
    kind = device.type
    if not torch.amp.is_autocast_available(kind) or not torch.is_autocast_enabled(kind):
        return None
    return torch.get_autocast_dtype(kind)


def _autocast_eligible(t, dtype) -> bool:
    # autocast casts floating tensors other than fp64 (torch's cached_cast rule)
    return (dtype is not None and isinstance(t, Tensor) and t.is_floating_point()
            and t.dtype != torch.float64)


def autocast_cast(t, dtype):
    """t as autocast hands it to F.linear when the autocast dtype is `dtype` (None: t)."""
    return t.to(dtype) if _autocast_eligible(t, dtype) else t


def autocast_result_dtype(t: Tensor, dtype) -> torch.dtype:
    """t's dtype after `autocast_cast(t, dtype)`."""
    return dtype if _autocast_eligible(t, dtype) else t.dtype


_AUTOCAST_LIB = torch.library.Library("pyengine", "IMPL")


def register_base_autocast(op_name: str, base_args: tuple[int, ...] = ()) -> None:
    """Declare the autocast rule of pyengine::<op_name> (cpu and cuda): the arguments at
    `base_args` (activations, bias) are cast like F.linear's inputs, the rest (frozen
    dense base weights, which the op casts to x's dtype itself where it uses them; fp32
    adapters, masks) pass unchanged, and the op runs with autocast off.
    No base_args (the backward ops): autocast off, the saved dtypes kept."""
    for kind in ("cpu", "cuda"):
        def kernel(*args, kind=kind):
            dtype = torch.get_autocast_dtype(kind)
            args = [autocast_cast(a, dtype) if i in base_args else a for i, a in enumerate(args)]
            with torch.autocast(kind, enabled=False):
                return getattr(torch.ops.pyengine, op_name)(*args)
        _AUTOCAST_LIB.impl(op_name, kernel, "Autocast" + kind.upper())


# --------------------------------------------------------------------------- reference
def reference_lora_linear(x: Tensor, weight: Tensor, lora_a: Tensor, lora_b: Tensor,
                          scale: float, *, bias: Tensor | None = None, dropout_p: float = 0.0,
                          dropout_keep: Tensor | None = None) -> Tensor:
    """The spec: plain PyTorch autograd, everything upcast to fp32 (fp64 stays fp64).
    dropout_keep: an explicit keep-mask; otherwise one is drawn with `dropout_mask`."""
    xf = _fp32_or_wider(x)
    y = F.linear(xf, _fp32_or_wider(weight), None if bias is None else _fp32_or_wider(bias))
    if dropout_p > 0.0:
        keep = dropout_mask(x, dropout_p) if dropout_keep is None else dropout_keep
        xf = xf * keep / (1.0 - dropout_p)
    y = y + scale * F.linear(F.linear(xf, _fp32_or_wider(lora_a)), _fp32_or_wider(lora_b))
    return y.to(x.dtype)


# --------------------------------------------------------------------------- the low-rank engine
def add_low_rank(out: Tensor, coef: Tensor, w: Tensor, alpha: float = 1.0,
                 mask: Tensor | None = None) -> None:
    """out += alpha * (coef @ w) * mask in place (coef [N, r], w [r, M]), in torch: the
    product in coef's dtype, added with one rounding to out's dtype."""
    if mask is None and coef.dtype == out.dtype:
        out.addmm_(coef, w, alpha=alpha)
    else:
        t = coef @ w
        out.add_(t if mask is None else t.mul_(mask), alpha=alpha)


def _scaled(t: Tensor, s: float) -> Tensor:
    return t if s == 1.0 else t.mul_(s)


def _torch_pass(src, src_mask, proj_w, scale, grad_coef, grad_scale, dst, add_w, add_coef, alpha,
                dst_mask):
    lr = next(t.dtype for t in (proj_w, grad_coef, add_w) if t is not None)
    s = None if src is None else (src if src_mask is None else src * src_mask).to(lr)
    proj = None if proj_w is None else _scaled(s @ proj_w.t(), scale)
    grad = None if grad_coef is None else _scaled(grad_coef.t() @ s, grad_scale)
    if dst is not None:
        add_low_rank(dst, proj if add_coef is None else add_coef, add_w, alpha, dst_mask)
    return proj, grad


def _f32(t):
    return None if t is None else t.to(torch.float32).contiguous()


def _cpu_pass(src, src_mask, proj_w, scale, grad_coef, grad_scale, dst, add_w, add_coef, alpha,
              dst_mask):
    rows = src if src is not None else dst
    lr = next(t.dtype for t in (proj_w, grad_coef, add_w) if t is not None)
    if _ext._C is None or rows.dtype not in KERNEL_DTYPES or lr == torch.float64:
        return _torch_pass(src, src_mask, proj_w, scale, grad_coef, grad_scale, dst, add_w,
                           add_coef, alpha, dst_mask)
    n = rows.shape[0]
    proj_w, add_w, add_coef = _f32(proj_w), _f32(add_w), _f32(add_coef)
    if grad_coef is not None:
        grad_coef = _scaled(grad_coef.to(torch.float32, copy=True).contiguous(), grad_scale)
    proj = None if proj_w is None else rows.new_empty(n, proj_w.shape[0], dtype=torch.float32)
    grad = (None if grad_coef is None
            else rows.new_zeros(grad_coef.shape[1], src.shape[1], dtype=torch.float32))
    _ext._C.lowrank_rows(
        _ext.dtype_code(rows), n, 0 if src is None else src.shape[1], _ext.ptr(src),
        _ext.ptr(src_mask), 0 if proj is None else proj.shape[1], _ext.ptr(proj_w),
        _ext.ptr(proj), float(scale), 0 if grad is None else grad.shape[0], _ext.ptr(grad_coef),
        _ext.ptr(grad), 0 if dst is None else add_w.shape[0], _ext.ptr(add_coef),
        _ext.ptr(add_w), float(alpha), _ext.ptr(dst), 0 if dst is None else dst.shape[1],
        _ext.ptr(dst_mask), _ext.num_threads())
    return (None if proj is None else proj.to(lr)), (None if grad is None else grad.to(lr))


def _triton_pass(src, src_mask, proj_w, scale, grad_coef, grad_scale, dst, add_w, add_coef,
                 alpha, dst_mask):
    from pyengine.kernels.lora import lora_down, lora_up_add
    proj = None if proj_w is None else lora_down(src, proj_w.contiguous(), src_mask, scale)
    grad = None
    if grad_coef is not None:  # torch's GEMM: a reduction over N, no Triton twin yet
        grad = _torch_pass(src, src_mask, None, 1.0, grad_coef, grad_scale, None, None, None,
                           1.0, None)[1]
    if dst is not None:
        lora_up_add(dst, (proj if add_coef is None else add_coef).contiguous(),
                    add_w.contiguous(), alpha, dst_mask)
    return proj, grad


_PASSES = {"cpu": _cpu_pass, "triton": _triton_pass}


def low_rank_pass(backend: str, src: Tensor | None = None, *, src_mask: Tensor | None = None,
                  proj_w: Tensor | None = None, scale: float = 1.0,
                  grad_coef: Tensor | None = None, grad_scale: float = 1.0,
                  dst: Tensor | None = None, add_w: Tensor | None = None,
                  add_coef: Tensor | None = None, alpha: float = 1.0,
                  dst_mask: Tensor | None = None) -> tuple[Tensor | None, Tensor | None]:
    """The one low-rank engine behind lora_linear and lora_mlp: the skinny products over
    the rows of src [N, K] and dst [N, M] (contiguous), fused into one pass on "cpu"
    (csrc/lowrank_rows.h; fp32 math for fp32/bf16/fp16 src and dst):
        proj = scale * (src * src_mask) @ proj_w.T                [N, r]  if proj_w is given
        grad = grad_scale * grad_coef.T @ (src * src_mask)        [r, K]  if grad_coef is given
        dst += alpha * (add_coef @ add_w) * dst_mask   in place   [N, M]  if dst is given
    add_coef None: this pass's proj.  Masks: dropout keep-masks (bool).  The low-rank
    operands share one dtype (the adapters'); proj and grad come back in it, None where not
    asked for.  "triton": proj and add in pyengine.kernels.lora; other backends: torch."""
    return _PASSES.get(backend, _torch_pass)(src, src_mask, proj_w, scale, grad_coef, grad_scale,
                                             dst, add_w, add_coef, alpha, dst_mask)


# --------------------------------------------------------------------------- custom ops
def _compute_dtype(x: Tensor, lora_a: Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, lora_a.dtype)


def base_linear(x: Tensor, weight: Tensor, bias: Tensor | None, qscales: Tensor | None,
                fmt: str, backend: str) -> Tensor:
    """x @ W.T + bias in x's dtype: F.linear for a dense W (fmt ""; cast to x's dtype
    first when it has another, as autocast would), quant_matmul's kernel for backend when W
    is quantized (weight = its qs, qscales its scales, fmt its format)."""
    if not fmt:
        return F.linear(x, weight.to(x.dtype), bias)
    return QUANT_BACKENDS[backend](x, weight, qscales, fmt, bias)


def base_grad_x(dy: Tensor, weight: Tensor, qscales: Tensor | None, fmt: str,
                backend: str) -> Tensor:
    """dy @ W (W dense, cast to dy's dtype in a buffer freed after the GEMM; or quantized as
    in `base_linear`; quant_matmul's backward: on "cpu" one C++ dequantize to dy's dtype and
    one GEMM, elsewhere row chunks in torch)."""
    if not fmt:
        return dy @ weight.to(dy.dtype)
    k = qscales.shape[1] * FORMATS[fmt].block
    if backend == "cpu":
        return dy @ dequantize_cpu(weight, qscales, fmt, k, dy.dtype)
    return _qmm_grad_x(dy, weight, qscales, fmt, k)


@torch.library.custom_op("pyengine::lora_linear", mutates_args=())
def _lora_fwd(x: Tensor, weight: Tensor, lora_a: Tensor, lora_b: Tensor, bias: Optional[Tensor],
              mask: Optional[Tensor], scale: float, keep: float, backend: str,
              qscales: Optional[Tensor] = None, fmt: str = "") -> tuple[Tensor, Tensor]:
    """(y, u): x [N, in] contiguous; u = keep * (x * mask) @ A.T in the compute dtype.
    A dense weight in another dtype than x's is cast to x's where used (autocast: it is
    saved uncast).  fmt not "": weight is a quantized base's qs, qscales its scales
    (`base_linear`)."""
    ct = _compute_dtype(x, lora_a)
    y = base_linear(x, weight, bias, qscales, fmt, backend)
    u, _ = low_rank_pass(backend, x, src_mask=mask, proj_w=lora_a.to(ct), scale=keep, dst=y,
                         add_w=lora_b.to(ct).t(), alpha=scale)
    return y, u


@_lora_fwd.register_fake
def _(x, weight, lora_a, lora_b, bias, mask, scale, keep, backend, qscales=None, fmt=""):
    return (x.new_empty(x.shape[0], lora_b.shape[0]),
            x.new_empty(x.shape[0], lora_a.shape[0], dtype=_compute_dtype(x, lora_a)))


@torch.library.custom_op("pyengine::lora_linear_backward", mutates_args=())
def _lora_bwd(grad_y: Tensor, x: Tensor, u: Tensor, weight: Tensor, lora_a: Tensor,
              lora_b: Tensor, mask: Optional[Tensor], scale: float, keep: float, backend: str,
              need_gx: bool, need_ga: bool, need_gb: bool, need_gbias: bool,
              qscales: Optional[Tensor] = None,
              fmt: str = "") -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx, dA, dB, dbias); empty where not asked for.  weight, qscales, fmt as in the
    forward."""
    ct = u.dtype
    grad_y = grad_y.contiguous()
    gx = ga = gb = gbias = None
    if need_gx:
        gx = base_grad_x(grad_y, weight, qscales, fmt, backend)
    if need_gx or need_ga or need_gb:  # one pass over dy (and dx): v, dB.T, dx += ...
        v, gbt = low_rank_pass(backend, grad_y,
                               proj_w=lora_b.to(ct).t() if need_gx or need_ga else None,
                               grad_coef=u if need_gb else None, grad_scale=scale, dst=gx,
                               add_w=lora_a.to(ct), alpha=scale * keep, dst_mask=mask)
        gb = None if gbt is None else gbt.t().contiguous().to(lora_b.dtype)
    if need_ga:  # one pass over x: dA
        _, ga = low_rank_pass(backend, x, src_mask=mask, grad_coef=v, grad_scale=scale * keep)
        ga = ga.to(lora_a.dtype)
    if need_gbias:
        gbias = grad_y.sum(0, dtype=torch.float32).to(x.dtype)
    return (x.new_empty(0) if gx is None else gx,
            lora_a.new_empty(0) if ga is None else ga,
            lora_b.new_empty(0) if gb is None else gb,
            x.new_empty(0) if gbias is None else gbias)


@_lora_bwd.register_fake
def _(grad_y, x, u, weight, lora_a, lora_b, mask, scale, keep, backend, need_gx, need_ga,
      need_gb, need_gbias, qscales=None, fmt=""):
    return (x.new_empty(x.shape if need_gx else (0,)),
            lora_a.new_empty(lora_a.shape if need_ga else (0,)),
            lora_b.new_empty(lora_b.shape if need_gb else (0,)),
            x.new_empty((lora_b.shape[0],) if need_gbias else (0,)))


def _setup_context(ctx, inputs, output):
    x, weight, lora_a, lora_b, bias, mask, scale, keep, backend, qscales, fmt = inputs
    ctx.args = (scale, keep, backend)
    ctx.fmt = fmt
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(x, output[1], weight, lora_a, lora_b, mask, qscales)


def _lora_grad(ctx, grad_y, _grad_u):
    x, u, weight, lora_a, lora_b, mask, qscales = ctx.saved_tensors
    need_gx, _, need_ga, need_gb, need_gbias = ctx.needs_input_grad[:5]
    gx, ga, gb, gbias = _lora_bwd(grad_y, x, u, weight, lora_a, lora_b, mask, *ctx.args,
                                  need_gx, need_ga, need_gb, need_gbias, qscales, ctx.fmt)
    return (gx if need_gx else None, None, ga if need_ga else None, gb if need_gb else None,
            gbias.to(ctx.bias_dtype) if need_gbias else None, None, None, None, None, None,
            None)


_lora_fwd.register_autograd(_lora_grad, setup_context=_setup_context)
register_base_autocast("lora_linear", base_args=(0, 4))  # x, bias (weight: cast in the op)
register_base_autocast("lora_linear_backward")


# --------------------------------------------------------------------------- public API
def _validate(x, weight, lora_a, lora_b, bias, dropout_p):
    """Shapes, devices and dtypes; the base's dtypes as they are after autocast's cast."""
    name = "lora_linear"
    quantized = isinstance(weight, QuantizedWeight)
    ac = autocast_dtype(x.device)
    x_dtype = autocast_result_dtype(x, ac)
    if not quantized and weight.dim() != 2:
        raise ValueError(f"{name}: weight must be [out, in], got shape {tuple(weight.shape)}")
    out_f, in_f = weight.shape
    if x.dim() < 1 or x.shape[-1] != in_f:
        raise ValueError(f"{name}: x {tuple(x.shape)} does not end in in_features = {in_f} of "
                         f"weight {tuple(weight.shape)}")
    if lora_a.dim() != 2 or lora_a.shape[1] != in_f:
        raise ValueError(f"{name}: lora_a must be [r, {in_f}], got {tuple(lora_a.shape)}")
    r = lora_a.shape[0]
    if tuple(lora_b.shape) != (out_f, r):
        raise ValueError(f"{name}: lora_b must be [{out_f}, {r}] (out, r), got "
                         f"{tuple(lora_b.shape)}")
    if x_dtype not in DTYPES or lora_a.dtype not in DTYPES:
        raise TypeError(f"{name}: x {x_dtype} / lora_a {lora_a.dtype}: supported dtypes are "
                        "float32 and bfloat16 (float64 for checks)")
    if quantized and x_dtype not in QUANT_X_DTYPES:
        raise TypeError(f"{name}: x dtype {x_dtype} not supported with a quantized weight "
                        "(float32, bfloat16)")
    if not quantized and autocast_result_dtype(weight, ac) != x_dtype:
        raise TypeError(f"{name}: weight dtype {weight.dtype} != x dtype {x.dtype}")
    if lora_b.dtype != lora_a.dtype:
        raise TypeError(f"{name}: lora_b dtype {lora_b.dtype} != lora_a dtype {lora_a.dtype}")
    if quantized and weight.device != x.device:
        raise ValueError(f"{name}: weight is on {weight.device}, x on {x.device}")
    if bias is not None and (tuple(bias.shape) != (out_f,)
                             or autocast_result_dtype(bias, ac) != x_dtype):
        raise ValueError(f"{name}: bias must be [{out_f}] of {x_dtype}, got "
                         f"{tuple(bias.shape)} {bias.dtype}")
    for k, t in {"weight": None if quantized else weight, "lora_a": lora_a, "lora_b": lora_b, "bias": bias}.items():
        if t is not None and t.device != x.device:
            raise ValueError(f"{name}: {k} is on {t.device}, x on {x.device}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"{name}: dropout_p must be in [0, 1), got {dropout_p}")
    if not quantized and weight.requires_grad and torch.is_grad_enabled():
        raise ValueError(f"{name}: weight requires grad, but the base weight is frozen here "
                         "(no dW is computed); call weight.requires_grad_(False)")


def lora_linear(x: Tensor, weight: Tensor | QuantizedWeight, lora_a: Tensor, lora_b: Tensor, scale: float, *,
                bias: Tensor | None = None, dropout_p: float = 0.0,
                backend: str | None = None) -> Tensor:
    """x @ W.T + bias + scale * (dropout(x) @ A.T) @ B.T with W frozen; see module doc.
    Dropout (probability dropout_p, applied to the adapter input only) draws its mask from
    torch's global generator (`dropout_mask`); pass dropout_p=0 in eval mode.
    weight may be a QuantizedWeight (QLoRA): the base term then runs quant_matmul's kernels
    inside the same op.
    Inside torch.autocast the base runs in the autocast dtype, the adapters in fp32."""
    _validate(x, weight, lora_a, lora_b, bias, dropout_p)
    chosen = resolve(OP, backend, x.device)
    quantized = isinstance(weight, QuantizedWeight)
    if chosen == "ref":
        ac = autocast_dtype(x.device)
        with torch.autocast(x.device.type, enabled=False):
            return reference_lora_linear(
                autocast_cast(x, ac), autocast_cast(weight.dequantize() if quantized else weight, ac),
                lora_a, lora_b, scale, bias=autocast_cast(bias, ac), dropout_p=dropout_p)
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    mask = dropout_mask(x2, dropout_p) if dropout_p > 0.0 else None
    base = ((weight.qs.contiguous(), weight.scales.contiguous(), weight.fmt) if quantized
            else (weight.contiguous(), None, ""))
    y, _ = _lora_fwd(x2, base[0], lora_a.contiguous(), lora_b.contiguous(),
                     None if bias is None else bias.contiguous(), mask, float(scale),
                     1.0 / (1.0 - dropout_p), chosen, base[1], base[2])
    return y.reshape(*x.shape[:-1], weight.shape[0])
