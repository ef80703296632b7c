"""RMSNorm and LayerNorm with the residual add fused in; one pass forward, one backward.

    s = x + residual                      (when a residual is given; returned with y)
    rms_norm:   rstd = rsqrt(mean(s^2) + eps),  y = weight * round(s * rstd)
                (HF LlamaRMSNorm: fp32 statistics, normalised row rounded to the input
                dtype before the weight multiply; bit-equal to HF in fp32 up to summation
                order)
    layer_norm: mean, rstd = rsqrt(var(s) + eps),  y = (s - mean) * rstd * weight + bias
                (torch.nn.LayerNorm: fp32 statistics, one rounding)

x, residual [..., H]; weight, bias [H]; one dtype (fp32, bf16, fp16; fp64 runs the
reference math, for gradcheck).  Mixed dtypes (e.g. an fp32 weight with bf16 x) are
promoted to the wider one first, which is the dtype HF's modules return then.  Backward
saves s and the fp32 statistics per row only, and gives dx (= dresidual) and fp32
dweight / dbias reduced over rows in a fixed block order (the same bits on any thread
count).  Autocast: the ops run in their inputs' dtypes (norms stay out of autocast, as
HF's RMSNorm does).  Floor: memory-bound; forward reads x (+ residual) and writes y
(+ s), backward reads s, dy (+ ds) and writes dx, at ~35 GB/s.

Backends: "ref" (plain PyTorch), "cpu" (csrc/norms.h), "triton" (pyengine.kernels.rms_norm,
pyengine.kernels.layer_norm).
"""
from __future__ import annotations

import torch
from torch import Tensor

from pyengine import _ext
from pyengine.backends import register_op, resolve

register_op("rms_norm", ("ref", "cpu", "triton"))
register_op("layer_norm", ("ref", "cpu", "triton"))
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
DTYPES = KERNEL_DTYPES + (torch.float64,)


# --------------------------------------------------------------------------- reference
def reference_rms_norm(x: Tensor, weight: Tensor, eps: float, residual: Tensor | None = None):
    """HF LlamaRMSNorm on x (+ residual): y, or (y, s) with a residual."""
    s = x if residual is None else x + residual
    h = s.to(torch.promote_types(s.dtype, torch.float32))
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    y = weight * h.to(s.dtype)
    return y if residual is None else (y, s)


def reference_layer_norm(x: Tensor, weight: Tensor, bias: Tensor, eps: float,
                         residual: Tensor | None = None):
    """torch's layer_norm on x (+ residual): y, or (y, s) with a residual."""
    s = x if residual is None else x + residual
    y = torch.nn.functional.layer_norm(s, s.shape[-1:], weight, bias, eps)
    return y if residual is None else (y, s)


def _rows(t: Tensor) -> Tensor:
    return t.reshape(-1, t.shape[-1])


def _none(like: Tensor) -> Tensor:
    """The empty tensor standing for an absent output (custom ops return fresh tensors)."""
    return like.new_empty(0)


def _ref_forward(layer, x, weight, bias, residual, eps):
    """(y, s or empty, mean or empty, rstd) in the kernels' contract, fp32 math."""
    s = x if residual is None else x + residual
    sf = _rows(s).to(torch.promote_types(s.dtype, torch.float32))
    if layer:
        mean = sf.mean(-1)
        rstd = torch.rsqrt(sf.var(-1, unbiased=False) + eps)
        y = (sf - mean[:, None]) * rstd[:, None] * weight.to(sf.dtype) + bias.to(sf.dtype)
    else:
        mean = _none(sf)
        rstd = torch.rsqrt(sf.pow(2).mean(-1) + eps)
        y = weight.to(sf.dtype) * (sf * rstd[:, None]).to(s.dtype).to(sf.dtype)
    return (y.to(x.dtype).view(x.shape), _none(x) if residual is None else s, mean, rstd)


def _ref_backward(layer, dy, ds, s, weight, mean, rstd, want_dw):
    """(dx, dweight fp32, dbias fp32 or empty) for the saved s and statistics."""
    ct = torch.promote_types(s.dtype, torch.float32)
    sf, dyf, w = _rows(s).to(ct), _rows(dy).to(ct), weight.to(ct)
    if layer:
        n = (sf - mean[:, None]) * rstd[:, None]
        dw_n, db = n, dyf.sum(0)
    else:
        n = sf * rstd[:, None]
        dw_n, db = n.to(s.dtype).to(ct), _none(n)
    g = dyf * w
    dot = (g * n).mean(-1, keepdim=True)
    centred = g - g.mean(-1, keepdim=True) if layer else g
    dx = rstd[:, None] * (centred - n * dot)
    if ds is not None:
        dx = dx + _rows(ds).to(ct)
    return dx.to(s.dtype).view(s.shape), (dyf * dw_n).sum(0), db


# --------------------------------------------------------------------------- kernels
def _cpu_forward(layer, x, weight, bias, residual, eps):
    rows, cols = x.numel() // x.shape[-1], x.shape[-1]
    y = torch.empty_like(x)
    s = None if residual is None else torch.empty_like(x)
    mean = torch.empty(rows) if layer else None
    rstd = torch.empty(rows)
    _ext._C.norm_forward(layer, _ext.dtype_code(x), rows, cols, eps, x.data_ptr(),
                         _ext.ptr(residual), weight.data_ptr(), _ext.ptr(bias), y.data_ptr(),
                         _ext.ptr(s), _ext.ptr(mean), rstd.data_ptr(), _ext.num_threads())
    return y, _none(x) if s is None else s, _none(rstd) if mean is None else mean, rstd


def _cpu_backward(layer, dy, ds, s, weight, mean, rstd, want_dw):
    rows, cols = s.numel() // s.shape[-1], s.shape[-1]
    dx = torch.empty_like(s)
    dw = torch.zeros(cols) if want_dw else None
    db = torch.zeros(cols) if want_dw and layer else None
    _ext._C.norm_backward(layer, _ext.dtype_code(s), rows, cols, weight.data_ptr(), s.data_ptr(),
                          mean.data_ptr() if layer else 0, rstd.data_ptr(), dy.data_ptr(),
                          _ext.ptr(ds), dx.data_ptr(), _ext.ptr(dw), _ext.ptr(db),
                          _ext.num_threads())
    return dx, _none(rstd) if dw is None else dw, _none(rstd) if db is None else db


def _triton_forward(layer, x, weight, bias, residual, eps):
    from pyengine.kernels.layer_norm import layer_norm_forward
    from pyengine.kernels.rms_norm import rms_norm_forward
    if layer:
        return layer_norm_forward(x, weight, bias, residual, eps)
    y, s, rstd = rms_norm_forward(x, weight, residual, eps)
    return y, s, _none(rstd), rstd


def _triton_backward(layer, dy, ds, s, weight, mean, rstd, want_dw):
    from pyengine.kernels.layer_norm import layer_norm_backward
    from pyengine.kernels.rms_norm import rms_norm_backward
    if layer:
        return layer_norm_backward(dy, ds, s, weight, mean, rstd)
    dx, dw = rms_norm_backward(dy, ds, s, weight, rstd)
    return dx, dw, _none(dw)


FORWARD = {"ref": _ref_forward, "cpu": _cpu_forward, "triton": _triton_forward}
BACKWARD = {"ref": _ref_backward, "cpu": _cpu_backward, "triton": _triton_backward}


def norm_forward(layer: bool, x, weight, bias, residual, eps: float, backend: str):
    """(y, s or empty, mean or empty, rstd [rows] fp32) on a resolved backend; all
    contiguous, one dtype."""
    return FORWARD[backend if x.dtype in KERNEL_DTYPES else "ref"](layer, x, weight, bias,
                                                                   residual, eps)


def norm_backward(layer: bool, dy, ds, s, weight, mean, rstd, backend: str, want_dw=True):
    """(dx, dweight fp32, dbias fp32 or empty) on a resolved backend; want_dw=False: the
    weight gradients may come back empty (the cpu kernel then skips them)."""
    return BACKWARD[backend if s.dtype in KERNEL_DTYPES else "ref"](layer, dy, ds, s, weight,
                                                                    mean, rstd, want_dw)


# --------------------------------------------------------------------------- custom ops
@torch.library.custom_op("pyengine::norm", mutates_args=())
def _norm(layer: bool, x: Tensor, weight: Tensor, bias: Tensor | None, residual: Tensor | None,
          eps: float, backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return norm_forward(layer, x, weight, bias, residual, eps, backend)


@_norm.register_fake
def _(layer, x, weight, bias, residual, eps, backend):
    rows = x.numel() // x.shape[-1]
    stat = x.new_empty(rows, dtype=torch.promote_types(x.dtype, torch.float32))
    return (torch.empty_like(x), x.new_empty(0) if residual is None else torch.empty_like(x),
            stat if layer else x.new_empty(0, dtype=stat.dtype), stat.clone())


def _setup_context(ctx, inputs, output):
    layer, x, weight, bias, residual, eps, backend = inputs
    _, s, mean, rstd = output
    ctx.layer, ctx.backend = layer, backend
    ctx.has_residual, ctx.has_bias = residual is not None, bias is not None
    ctx.mark_non_differentiable(mean, rstd)
    ctx.save_for_backward(x if residual is None else s, weight, mean, rstd)


def _norm_grad(ctx, dy, ds, _dmean, _drstd):
    s, weight, mean, rstd = ctx.saved_tensors
    want_dw = ctx.needs_input_grad[2] or (ctx.has_bias and ctx.needs_input_grad[3])
    dx, dw, db = _norm_backward(ctx.layer, dy.contiguous(),
                                ds.contiguous() if ctx.has_residual and ds is not None else None,
                                s, weight, mean, rstd, ctx.backend, want_dw)
    return (None, dx, dw.to(weight.dtype) if want_dw else None,
            db.to(weight.dtype) if want_dw and ctx.has_bias else None,
            dx if ctx.has_residual else None, None, None)


@torch.library.custom_op("pyengine::norm_backward", mutates_args=())
def _norm_backward(layer: bool, dy: Tensor, ds: Tensor | None, s: Tensor, weight: Tensor,
                   mean: Tensor, rstd: Tensor, backend: str,
                   want_dw: bool) -> tuple[Tensor, Tensor, Tensor]:
    dx, dw, db = norm_backward(layer, dy, ds, s, weight, mean, rstd, backend, want_dw)
    return (dx, dw, db) if want_dw else (dx, _none(rstd), _none(rstd))


@_norm_backward.register_fake
def _(layer, dy, ds, s, weight, mean, rstd, backend, want_dw):
    acc = torch.promote_types(s.dtype, torch.float32)
    cols = s.shape[-1] if want_dw else 0
    return (torch.empty_like(s), s.new_empty(cols, dtype=acc),
            s.new_empty(cols if layer else 0, dtype=acc))


_norm.register_autograd(_norm_grad, setup_context=_setup_context)


def _check(name, x, params, residual):
    """Validated, promoted, contiguous (x, params..., residual)."""
    tensors = [x, *params] + ([] if residual is None else [residual])
    dtype = x.dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    if dtype not in DTYPES:
        raise TypeError(f"{name}: dtypes {[t.dtype for t in tensors]} promote to {dtype}; "
                        f"allowed: {DTYPES}")
    if x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError(f"{name}: x {tuple(x.shape)} needs a non-empty last dimension")
    for what, p in zip(("weight", "bias"), params):
        if p.shape != x.shape[-1:]:
            raise ValueError(f"{name}: {what} {tuple(p.shape)} must be [{x.shape[-1]}] "
                             f"(x is {tuple(x.shape)})")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"{name}: residual {tuple(residual.shape)} != x {tuple(x.shape)}")
    if any(t.device != x.device for t in tensors):
        raise ValueError(f"{name}: tensors on {[str(t.device) for t in tensors]}, need one device")
    return [t.to(dtype).contiguous() for t in tensors]


def rms_norm(x: Tensor, weight: Tensor, eps: float, residual: Tensor | None = None, *,
             backend: str | None = None):
    """HF RMSNorm of x, or of s = x + residual returning (y, s)."""
    x, weight, *res = _check("rms_norm", x, [weight], residual)
    chosen = resolve("rms_norm", backend, x.device)
    if chosen == "ref":
        return reference_rms_norm(x, weight, eps, *res)
    y, s, _, _ = _norm(False, x, weight, None, res[0] if res else None, float(eps), chosen)
    return (y, s) if res else y


def layer_norm(x: Tensor, weight: Tensor, bias: Tensor, eps: float,
               residual: Tensor | None = None, *, backend: str | None = None):
    """LayerNorm of x over its last dimension, or of s = x + residual returning (y, s)."""
    x, weight, bias, *res = _check("layer_norm", x, [weight, bias], residual)
    chosen = resolve("layer_norm", backend, x.device)
    if chosen == "ref":
        return reference_layer_norm(x, weight, bias, eps, *res)
    y, s, _, _ = _norm(True, x, weight, bias, res[0] if res else None, float(eps), chosen)
    return (y, s) if res else y
