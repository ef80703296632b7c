"""LoRA linear: a frozen base linear plus a low-rank update, forward and backward in one op.

    y = x @ W.T + bias + scale * (dropout(x) @ A.T) @ B.T

x [..., in] (fp32 or bf16), W [out, in] frozen (same dtype as x), bias [out] optional,
A [r, in] and B [out, r] the adapters (fp32 or bf16; bf16 base with fp32 adapters is the
usual mixed setup).  QLoRA: W may be a pyengine.quant.QuantizedWeight (q8_0 / q4_0 / nf4);
the base term x @ dequant(W).T + bias (and its dx) is then pyengine.ops.quant_matmul on the
same backend, and the op below runs the low-rank term alone (its base weight is None).  The low-rank path runs in ct = promote(x.dtype, A.dtype) with fp32
accumulation; y and dx come back in x's dtype.  B @ A is never formed.

Forward:  y = x @ W.T (+ bias)                   torch GEMM (the floor)
          u = keep * (x * mask) @ A.T            [N, r], saved for backward
          y += scale * u @ B.T                   one pass over y
Backward: dx = dy @ W                            torch GEMM (W frozen: no dW GEMM)
          v = dy @ B                             [N, r]
          dx += scale * keep * (v @ A) * mask    one pass over dx
          dA = scale * keep * v.T @ (x * mask),  dB = scale * dy.T @ u
mask is the dropout keep-mask (bool [N, in], only when dropout_p > 0; keep = 1/(1-p));
backward saves x, u (and the mask), never a dropped-out copy of x.

Autocast: inside torch.autocast the frozen base (x, W, bias) is cast as F.linear's inputs
are (to the autocast dtype), the adapters are not: they stay fp32 master weights, run the
low-rank math in fp32 and get fp32 gradients; y comes back in the autocast dtype, as
F.linear's would (`register_base_autocast`, also used by pyengine.ops.lora_mlp).

Backends: "ref" (plain PyTorch autograd, upcast to fp32: the spec), "cpu" (the skinny
products with their scale-and-add in C++, csrc/lora.h, where they measured faster than
torch; the rest torch), "triton" (skinny products in pyengine.kernels.lora).
Floor (N tokens, r << in, out): 2 GEMMs of 2*N*in*out flops (x@W.T, dy@W) plus
~6 skinny products of 2*N*r*(in|out) flops that are bound by memory: they read x and dy
twice and read+write y and dx once (~ N*(3*in + 3*out) elements).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from pyengine import _ext
from pyengine.backends import register_op, resolve
from pyengine.ops.quant import quant_matmul
from pyengine.quant import QuantizedWeight

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
    `base_args` (activations, frozen base weights, bias) are cast like F.linear's inputs,
    the rest (fp32 adapters, masks) pass unchanged, and the op runs with autocast off.
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


# --------------------------------------------------------------------------- skinny products
# Each backend provides two steps (w_* in the compute dtype, contiguous):
# lowrank_add(x, w_down, x_mask, keep, out, w_up, alpha, out_mask) -> u
#     u = keep * (x * x_mask) @ w_down.T   [N, r]; then, unless out is None,
#     out += alpha * (u @ w_up) * out_mask  in place (out [N, M], w_up [r, M])
# outer2(x1, u1, mask1, alpha1, x2, u2, alpha2) -> (alpha1 * u1.T @ (x1 * mask1),
#     alpha2 * u2.T @ x2)  [r, K1], [r, K2]; a pair whose x is None gives None
def _torch_down(x, w, mask, keep):
    xm = x if mask is None else x * mask
    u = xm.to(w.dtype) @ w.t()
    return u if keep == 1.0 else u.mul_(keep)


def _torch_up_add(out, u, w, alpha, mask):
    if mask is None and u.dtype == out.dtype:
        out.addmm_(u, w, alpha=alpha)
    else:
        t = u @ w
        out.add_(t if mask is None else t.mul_(mask), alpha=alpha)


def _torch_outer(x, u, mask, alpha):
    if x is None:
        return None
    xm = x if mask is None else x * mask
    return torch.mm(u.t(), xm.to(u.dtype)).mul_(alpha)


def _torch_outer2(x1, u1, mask1, alpha1, x2, u2, alpha2):
    return _torch_outer(x1, u1, mask1, alpha1), _torch_outer(x2, u2, None, alpha2)


def _composed_lowrank_add(down, up_add):
    def lowrank_add(x, w_down, x_mask, keep, out, w_up, alpha, out_mask):
        u = down(x, w_down, x_mask, keep)
        if out is not None:
            up_add(out, u, w_up, alpha, out_mask)
        return u
    return lowrank_add


_torch_lowrank_add = _composed_lowrank_add(_torch_down, _torch_up_add)

# Thread count of the C++ skinny kernels: torch's.  (They used to run on the calling thread
# only: with the old pool the caller waited for a worker still competing with torch's
# spinning OpenMP threads.  Since parallel_for claims tasks dynamically, 2 threads measured
# 3-5% faster than 1 in the op, fwd+bwd at 2048x2048 r16, fp32 and bf16.)


def _cpu_lowrank_add(x, w_down, x_mask, keep, out, w_up, alpha, out_mask):
    if w_down.dtype != torch.float32:  # the C++ kernels take fp32 adapters (bf16 ones: torch)
        return _torch_lowrank_add(x, w_down, x_mask, keep, out, w_up, alpha, out_mask)
    u = torch.empty(x.shape[0], w_down.shape[0], dtype=torch.float32)
    _ext._C.lora_down_up_add(
        x.data_ptr(), _ext.dtype_code(x), x.shape[0], x.shape[1], w_down.data_ptr(),
        w_down.shape[0], _ext.ptr(x_mask), keep, u.data_ptr(), _ext.ptr(out),
        _ext.dtype_code(x if out is None else out), 0 if out is None else out.shape[1],
        _ext.ptr(w_up), alpha, _ext.ptr(out_mask), _ext.num_threads())
    return u


def _cpu_outer2(x1, u1, mask1, alpha1, x2, u2, alpha2):
    if (u1 if x1 is not None else u2).dtype != torch.float32:
        return _torch_outer2(x1, u1, mask1, alpha1, x2, u2, alpha2)
    if x1 is None:  # the kernel's optional pair is the second one
        return None, _cpu_outer2(x2, u2, None, alpha2, None, None, 0.0)[0]
    g1 = torch.empty(u1.shape[1], x1.shape[1], dtype=torch.float32)
    g2 = None if x2 is None else torch.empty(u2.shape[1], x2.shape[1], dtype=torch.float32)
    _ext._C.lora_outer2(
        x1.data_ptr(), _ext.dtype_code(x1), x1.shape[1], u1.data_ptr(), _ext.ptr(mask1), alpha1,
        g1.data_ptr(), _ext.ptr(x2), _ext.dtype_code(x1 if x2 is None else x2),
        0 if x2 is None else x2.shape[1], _ext.ptr(u2), alpha2, _ext.ptr(g2), x1.shape[0],
        u1.shape[1], _ext.num_threads())
    return g1, g2


def _triton_lowrank_add(*args):
    from pyengine.kernels.lora import lora_down, lora_up_add
    return _composed_lowrank_add(lora_down, lora_up_add)(*args)


SKINNY = {"cpu": (_cpu_lowrank_add, _cpu_outer2),
          "triton": (_triton_lowrank_add, _torch_outer2)}


# --------------------------------------------------------------------------- custom ops
def _compute_dtype(x: Tensor, lora_a: Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, lora_a.dtype)


@torch.library.custom_op("pyengine::lora_linear", mutates_args=())
def _lora_fwd(x: Tensor, weight: Optional[Tensor], lora_a: Tensor, lora_b: Tensor, bias: Optional[Tensor],
              mask: Optional[Tensor], scale: float, keep: float,
              backend: str) -> tuple[Tensor, Tensor]:
    """(y, u): x [N, in] contiguous; u = keep * (x * mask) @ A.T in the compute dtype.
    weight None: y is the low-rank term alone (the base is computed by the caller)."""
    lowrank_add, _ = SKINNY[backend]
    ct = _compute_dtype(x, lora_a)
    y = (x.new_zeros(x.shape[0], lora_b.shape[0]) if weight is None
         else F.linear(x, weight, bias))
    u = lowrank_add(x, lora_a.to(ct), mask, keep, y, lora_b.to(ct).t().contiguous(), scale, None)
    return y, u


@_lora_fwd.register_fake
def _(x, weight, lora_a, lora_b, bias, mask, scale, keep, backend):
    return (x.new_empty(x.shape[0], lora_b.shape[0]),
            x.new_empty(x.shape[0], lora_a.shape[0], dtype=_compute_dtype(x, lora_a)))


@torch.library.custom_op("pyengine::lora_linear_backward", mutates_args=())
def _lora_bwd(grad_y: Tensor, x: Tensor, u: Tensor, weight: Optional[Tensor], lora_a: Tensor,
              lora_b: Tensor, mask: Optional[Tensor], scale: float, keep: float, backend: str,
              need_gx: bool, need_ga: bool, need_gb: bool,
              need_gbias: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx, dA, dB, dbias); empty where not asked for.  weight None: dx of the low-rank
    term alone."""
    lowrank_add, outer2 = SKINNY[backend]
    ct = u.dtype
    grad_y = grad_y.contiguous()
    gx = ga = gb = gbias = None
    if need_gx:
        gx = x.new_zeros(x.shape) if weight is None else grad_y @ weight
    if need_gx or need_ga:
        v = lowrank_add(grad_y, lora_b.to(ct).t().contiguous(), None, 1.0, gx,
                        lora_a.to(ct), scale * keep, mask)
    if need_ga or need_gb:
        ga, gbt = outer2(x if need_ga else None, v if need_ga else None, mask, scale * keep,
                         grad_y if need_gb else None, u, scale)
        ga = None if ga is None else ga.to(lora_a.dtype)
        gb = None if gbt is None else gbt.t().contiguous().to(lora_b.dtype)
    if need_gbias:
        gbias = grad_y.sum(0, dtype=torch.float32).to(x.dtype)
    return (x.new_empty(0) if gx is None else gx,
            lora_a.new_empty(0) if ga is None else ga,
            lora_b.new_empty(0) if gb is None else gb,
            x.new_empty(0) if gbias is None else gbias)


@_lora_bwd.register_fake
def _(grad_y, x, u, weight, lora_a, lora_b, mask, scale, keep, backend, need_gx, need_ga,
      need_gb, need_gbias):
    return (x.new_empty(x.shape if need_gx else (0,)),
            lora_a.new_empty(lora_a.shape if need_ga else (0,)),
            lora_b.new_empty(lora_b.shape if need_gb else (0,)),
            x.new_empty((lora_b.shape[0],) if need_gbias else (0,)))


def _setup_context(ctx, inputs, output):
    x, weight, lora_a, lora_b, bias, mask, scale, keep, backend = inputs
    ctx.args = (scale, keep, backend)
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(x, output[1], weight, lora_a, lora_b, mask)


def _lora_grad(ctx, grad_y, _grad_u):
    x, u, weight, lora_a, lora_b, mask = ctx.saved_tensors
    need_gx, _, need_ga, need_gb, need_gbias = ctx.needs_input_grad[:5]
    gx, ga, gb, gbias = _lora_bwd(grad_y, x, u, weight, lora_a, lora_b, mask, *ctx.args,
                                  need_gx, need_ga, need_gb, need_gbias)
    return (gx if need_gx else None, None, ga if need_ga else None, gb if need_gb else None,
            gbias.to(ctx.bias_dtype) if need_gbias else None, None, None, None, None)


_lora_fwd.register_autograd(_lora_grad, setup_context=_setup_context)
register_base_autocast("lora_linear", base_args=(0, 1, 4))  # x, weight, bias
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
    weight may be a QuantizedWeight (QLoRA): the base term is then quant_matmul.
    Inside torch.autocast the base runs in the autocast dtype, the adapters in fp32."""
    _validate(x, weight, lora_a, lora_b, bias, dropout_p)
    chosen = resolve(OP, backend, x.device)
    quantized = isinstance(weight, QuantizedWeight)
    ac = autocast_dtype(x.device)
    if chosen == "ref" or quantized:  # base outside the op: autocast's casts done here
        x, bias = autocast_cast(x, ac), autocast_cast(bias, ac)
    if chosen == "ref":
        with torch.autocast(x.device.type, enabled=False):
            return reference_lora_linear(
                x, autocast_cast(weight.dequantize() if quantized else weight, ac), lora_a,
                lora_b, scale, bias=bias, dropout_p=dropout_p)
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    mask = dropout_mask(x2, dropout_p) if dropout_p > 0.0 else None
    y, _ = _lora_fwd(x2, None if quantized else weight.contiguous(), lora_a.contiguous(),
                     lora_b.contiguous(), None if quantized or bias is None else bias.contiguous(),
                     mask, float(scale), 1.0 / (1.0 - dropout_p), chosen)
    if quantized:
        with torch.autocast(x.device.type, enabled=False):
            y = y + quant_matmul(x2, weight, bias=bias, backend=chosen)
    return y.reshape(*x.shape[:-1], weight.shape[0])
