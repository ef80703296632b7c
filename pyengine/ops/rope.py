"""Rotary position embedding of q and k in one op (HF's rotate_half convention).

    y = x * cos + rotate_half(x) * sin,   rotate_half([x1, x2]) = [-x2, x1]
    backward: dx = dy * cos + rotate_half^T(dy * sin),  rotate_half^T([z1, z2]) = [z2, -z1]

q [B, Hq, S, D], k [B, Hk, S, D] (any strides over B, H, S with D contiguous, e.g. HF's
transposed projections, read without a copy); cos, sin [B or 1, S, D] as HF's rotary
embedding returns them.  fp32 math with one rounding per output element (HF in bf16
rounds three times).  Mixed dtypes (bf16 q with fp32 cos under autocast) are promoted to
the wider one, which is what HF returns then; the op itself stays out of autocast.
Not in place: torch.library's register_autograd takes only ops that mutate nothing, and q,
k are views of the projections' outputs that autograd may still need; so the op returns
fresh q, k (torch.empty_like: the inputs' strides when they are dense) and makes no other
temporary.  cos and sin get no gradient (HF's come from a buffer).
Floor: memory-bound; reads q, k, cos, sin and writes q, k once each way at ~35 GB/s.

Backends: "ref" (plain PyTorch), "cpu" (csrc/rope.h), "triton" (pyengine.kernels.rope).
"""
from __future__ import annotations

import torch
from torch import Tensor

from pyengine import _ext
from pyengine.backends import register_op, resolve

OP = "rope"
register_op(OP, ("ref", "cpu", "triton"))
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
DTYPES = KERNEL_DTYPES + (torch.float64,)


# --------------------------------------------------------------------------- reference
def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def reference_rope(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """HF's apply_rotary_pos_emb (cos, sin unsqueezed at dim 1)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _ref_rotate(x, cos, sin, backward):
    """fp32 math (fp64 stays fp64), result in x's dtype: the kernels' contract."""
    ct = torch.promote_types(x.dtype, torch.float32)
    xf, c, s = x.to(ct), cos.unsqueeze(1).to(ct), sin.unsqueeze(1).to(ct)
    if backward:
        z1, z2 = (xf * s).chunk(2, dim=-1)
        y = xf * c + torch.cat((z2, -z1), dim=-1)
    else:
        y = xf * c + _rotate_half(xf) * s
    return y.to(x.dtype)


# --------------------------------------------------------------------------- kernels
def _ref(q, k, cos, sin, backward):
    return _ref_rotate(q, cos, sin, backward), _ref_rotate(k, cos, sin, backward)


def _strides(x, y):
    return (*x.stride()[:3], *y.stride()[:3])


def _cpu(q, k, cos, sin, backward):
    qo, ko = torch.empty_like(q), torch.empty_like(k)
    B, _, S, D = q.shape
    _ext._C.rope(backward, _ext.dtype_code(q), B, S, D, cos.stride(0) if cos.shape[0] > 1 else 0,
                 cos.data_ptr(), sin.data_ptr(), q.data_ptr(), qo.data_ptr(), q.shape[1],
                 _strides(q, qo), k.data_ptr(), ko.data_ptr(), k.shape[1], _strides(k, ko),
                 _ext.num_threads())
    return qo, ko


def _triton(q, k, cos, sin, backward):
    from pyengine.kernels.rope import rope
    return rope(q, k, cos, sin, backward)


KERNELS = {"ref": _ref, "cpu": _cpu, "triton": _triton}


def rope_kernel(q, k, cos, sin, backward: bool, backend: str):
    """(q', k') on a resolved backend; checked layouts (see _check)."""
    return KERNELS[backend if q.dtype in KERNEL_DTYPES else "ref"](q, k, cos, sin, backward)


# --------------------------------------------------------------------------- custom op
@torch.library.custom_op("pyengine::rope", mutates_args=())
def _rope(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, backward: bool,
          backend: str) -> tuple[Tensor, Tensor]:
    return rope_kernel(q, k, cos, sin, backward, backend)


@_rope.register_fake
def _(q, k, cos, sin, backward, backend):
    return torch.empty_like(q), torch.empty_like(k)


def _setup_context(ctx, inputs, output):
    _, _, cos, sin, backward, backend = inputs
    ctx.backward, ctx.backend = backward, backend
    ctx.save_for_backward(cos, sin)


def _rope_grad(ctx, dq, dk):
    cos, sin = ctx.saved_tensors
    dq, dk = _rope(_unit_stride(dq), _unit_stride(dk), cos, sin, not ctx.backward, ctx.backend)
    return dq, dk, None, None, None, None


_rope.register_autograd(_rope_grad, setup_context=_setup_context)


def _unit_stride(t: Tensor) -> Tensor:
    """t itself when its last dimension is contiguous (the kernels take any other strides)."""
    return t if t.stride(-1) == 1 else t.contiguous()


def rope(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, *,
         backend: str | None = None) -> tuple[Tensor, Tensor]:
    """(q * cos + rotate_half(q) * sin, the same for k): HF's apply_rotary_pos_emb."""
    if q.dim() != 4 or k.dim() != 4 or cos.dim() != 3:
        raise ValueError(f"rope: q {tuple(q.shape)}, k {tuple(k.shape)} must be [B, H, S, D] "
                         f"and cos {tuple(cos.shape)} [B, S, D]")
    B, _, S, D = q.shape
    if k.shape[0] != B or k.shape[2:] != q.shape[2:] or D % 2:
        raise ValueError(f"rope: q {tuple(q.shape)} and k {tuple(k.shape)} need the same B, S "
                         f"and an even head dim D")
    if sin.shape != cos.shape or cos.shape[1:] != (S, D) or cos.shape[0] not in (1, B):
        raise ValueError(f"rope: cos {tuple(cos.shape)} and sin {tuple(sin.shape)} must both "
                         f"be [{B} or 1, {S}, {D}]")
    if torch.is_grad_enabled() and (cos.requires_grad or sin.requires_grad):
        raise ValueError("rope: cos and sin get no gradient here; detach them (HF's rotary "
                         "embedding has no trainable parameters)")
    dtype = q.dtype
    for t in (k, cos, sin):
        dtype = torch.promote_types(dtype, t.dtype)
    if dtype not in DTYPES:
        raise TypeError(f"rope: dtypes {q.dtype}, {k.dtype}, {cos.dtype}, {sin.dtype} promote "
                        f"to {dtype}; allowed: {DTYPES}")
    if len({t.device for t in (q, k, cos, sin)}) != 1:
        raise ValueError(f"rope: q, k, cos, sin must be on one device, got {q.device}, "
                         f"{k.device}, {cos.device}, {sin.device}")
    q, k, cos, sin = (t.to(dtype) for t in (q, k, cos, sin))
    chosen = resolve(OP, backend, q.device)
    if chosen == "ref":
        return reference_rope(q, k, cos, sin)
    return _rope(_unit_stride(q), _unit_stride(k), cos.contiguous(), sin.contiguous(), False,
                 chosen)
