"""SwiGLU, the gated activation of Llama-family MLPs, with a fused backward.

    h = silu(g) * u                      silu(g) = g * sigmoid(g)
    du = dh * silu(g),  dg = dh * u * s * (1 + g * (1 - s)),  s = sigmoid(g)

g, u [...] of one shape and dtype (fp32, bf16, fp16); math in fp32 (bf16/fp16 rounded once
on store).  fp64 is accepted for gradcheck and runs the reference math in fp64.  Backward saves only g and u and recomputes sigmoid (no silu(g) tensor is kept,
unlike `F.silu(g) * u` under autograd, which keeps silu(g) as well).  The backward kernel
can also hand back the recomputed h (used by lora_mlp for the down-projection adapter).
Floor: memory-bound; forward moves 3n elements, backward 5n (6n with h) at ~35 GB/s.

Backends: "ref" (plain PyTorch), "cpu" (csrc/swiglu.h), "triton" (pyengine.kernels.swiglu).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from pyengine import _ext
from pyengine.backends import register_op, resolve

OP = "swiglu"
register_op(OP, ("ref", "cpu", "triton"))
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
DTYPES = KERNEL_DTYPES + (torch.float64,)


# --------------------------------------------------------------------------- reference
def _math_dtype(dtype):
    return torch.promote_types(dtype, torch.float32)


def reference_swiglu(g: Tensor, u: Tensor) -> Tensor:
    """The spec: fp32 math (fp64 stays fp64), result in the input dtype."""
    ct = _math_dtype(g.dtype)
    return (F.silu(g.to(ct)) * u.to(ct)).to(g.dtype)


def reference_swiglu_backward(dh: Tensor, g: Tensor, u: Tensor, want_h: bool = False):
    """(dg, du, h or None) of h = silu(g) * u, fp32 math (fp64 stays fp64), results in
    g's dtype."""
    ct = _math_dtype(g.dtype)
    gf, uf, dhf = g.to(ct), u.to(ct), dh.to(ct)
    s = torch.sigmoid(gf)
    silu = gf * s
    dg = dhf * uf * s * (1 + gf * (1 - s))
    h = (silu * uf).to(g.dtype) if want_h else None
    return dg.to(g.dtype), (dhf * silu).to(g.dtype), h


# --------------------------------------------------------------------------- kernels
def _cpu_forward(g, u):
    h = torch.empty_like(g)
    _ext._C.swiglu_forward(g.data_ptr(), u.data_ptr(), h.data_ptr(), _ext.dtype_code(g),
                           g.numel(), _ext.num_threads())
    return h


def _cpu_backward(dh, g, u, want_h=False):
    dg, du = torch.empty_like(g), torch.empty_like(g)
    h = torch.empty_like(g) if want_h else None
    _ext._C.swiglu_backward(dh.data_ptr(), g.data_ptr(), u.data_ptr(), dg.data_ptr(),
                            du.data_ptr(), _ext.ptr(h), _ext.dtype_code(g), g.numel(),
                            _ext.num_threads())
    return dg, du, h


def _triton_forward(g, u):
    from pyengine.kernels.swiglu import swiglu_forward
    return swiglu_forward(g, u)


def _triton_backward(dh, g, u, want_h=False):
    from pyengine.kernels.swiglu import swiglu_backward
    return swiglu_backward(dh, g, u, want_h)


FORWARD = {"ref": reference_swiglu, "cpu": _cpu_forward, "triton": _triton_forward}
BACKWARD = {"ref": reference_swiglu_backward, "cpu": _cpu_backward, "triton": _triton_backward}


def swiglu_forward(g: Tensor, u: Tensor, backend: str) -> Tensor:
    """h = silu(g) * u on a resolved backend; g, u contiguous, same shape and dtype."""
    return FORWARD[backend if g.dtype in KERNEL_DTYPES else "ref"](g, u)


def swiglu_backward(dh: Tensor, g: Tensor, u: Tensor, backend: str, want_h: bool = False):
    """(dg, du, h or None) on a resolved backend; all contiguous, same shape and dtype."""
    return BACKWARD[backend if g.dtype in KERNEL_DTYPES else "ref"](dh, g, u, want_h)


# --------------------------------------------------------------------------- custom op
@torch.library.custom_op("pyengine::swiglu", mutates_args=())
def _swiglu(g: Tensor, u: Tensor, backend: str) -> Tensor:
    return swiglu_forward(g, u, backend)


@_swiglu.register_fake
def _(g, u, backend):
    return torch.empty_like(g)


def _setup_context(ctx, inputs, output):
    g, u, backend = inputs
    ctx.backend = backend
    ctx.save_for_backward(g, u)


def _swiglu_grad(ctx, dh):
    g, u = ctx.saved_tensors
    dg, du = _swiglu_backward(dh.contiguous(), g, u, ctx.backend)
    return dg, du, None


@torch.library.custom_op("pyengine::swiglu_backward", mutates_args=())
def _swiglu_backward(dh: Tensor, g: Tensor, u: Tensor, backend: str) -> tuple[Tensor, Tensor]:
    dg, du, _ = swiglu_backward(dh, g, u, backend)
    return dg, du


@_swiglu_backward.register_fake
def _(dh, g, u, backend):
    return torch.empty_like(g), torch.empty_like(g)


_swiglu.register_autograd(_swiglu_grad, setup_context=_setup_context)


def swiglu(g: Tensor, u: Tensor, *, backend: str | None = None) -> Tensor:
    """silu(g) * u with a backward that keeps only g and u."""
    if g.shape != u.shape:
        raise ValueError(f"swiglu: g {tuple(g.shape)} and u {tuple(u.shape)} must have one shape")
    if g.dtype != u.dtype or g.dtype not in DTYPES:
        raise TypeError(f"swiglu: g and u must share a dtype among {DTYPES}, got {g.dtype}, "
                        f"{u.dtype}")
    if g.device != u.device:
        raise ValueError(f"swiglu: g is on {g.device}, u on {u.device}")
    chosen = resolve(OP, backend, g.device)
    if chosen == "ref":
        return reference_swiglu(g, u)
    return _swiglu(g.contiguous(), u.contiguous(), chosen)
