"""Scaled-dot-product attention for training: flash-style forward + recomputing backward.

    S = scale * q k^T,  masked (causal: key j > query i; key_padding_mask False) to -inf
    P = softmax(S) per row,  out = P v,  lse = logsumexp(S) per row (fp32, saved)
    backward: P recomputed from q, k, lse; dv = P^T dout, dS = P * (dout v^T - rowsum(dout*out)),
              dq = scale dS k, dk = scale dS^T q

q [B, Hq, S, D], k / v [B, Hkv, S, D] with Hq % Hkv == 0 (GQA: query head h uses kv head
h // (Hq // Hkv); K/V are never expanded), one dtype among fp32 / bf16 / fp16 (fp64 runs the
reference math in fp64, for gradcheck); key_padding_mask [B, S] bool, True = attend.  A row
with no key to attend to gives out 0 and zero gradients, never NaN.  Math in fp32; the
saved state is out and lse only, never an S x S matrix.  Backward reductions (dk/dv over the
GQA group and query blocks, dq over key blocks) run in a fixed order: same bits on any
thread count.
Floor (FLOPs): forward 4 B Hq S^2 D (half when causal), backward 2.5x that.

Backends: "ref" (plain PyTorch), "cpu" (csrc/attention.h), "triton" (pyengine.kernels.attention).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from pyengine import _ext
from pyengine.backends import register_op, resolve

OP = "attention"
register_op(OP, ("ref", "cpu", "triton"))
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
DTYPES = KERNEL_DTYPES + (torch.float64,)


# --------------------------------------------------------------------------- reference
def _allowed(S: int, causal: bool, key_padding_mask: Tensor | None, device) -> Tensor:
    """[B or 1, 1, S, S] bool: query i may attend key j."""
    allowed = torch.ones(S, S, dtype=torch.bool, device=device)
    if causal:
        allowed = allowed.tril()
    allowed = allowed[None, None]
    if key_padding_mask is not None:
        allowed = allowed & key_padding_mask[:, None, None, :]
    return allowed


def _reference_probs(q, k, causal, key_padding_mask, scale):
    """(P [B, Hq, S, S], lse [B, Hq, S]) in q's math dtype; rows with no key: P = 0, lse = -inf."""
    ct = torch.promote_types(q.dtype, torch.float32)
    g = q.shape[1] // k.shape[1]
    s = scale * q.to(ct) @ k.to(ct).repeat_interleave(g, dim=1).transpose(-1, -2)
    s = s.masked_fill(~_allowed(q.shape[2], causal, key_padding_mask, q.device), float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    return torch.exp(s - lse[..., None].masked_fill(lse[..., None] == float("-inf"), 0)), lse


def _scale(q, scale):
    return 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale


def reference_attention_lse(q: Tensor, k: Tensor, v: Tensor, causal: bool = True,
                            key_padding_mask: Tensor | None = None,
                            scale: float | None = None) -> tuple[Tensor, Tensor]:
    """(out in q's dtype, lse fp32 [B, Hq, S]): the spec, fp32 math (fp64 stays fp64)."""
    p, lse = _reference_probs(q, k, causal, key_padding_mask, _scale(q, scale))
    out = p @ v.to(p.dtype).repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    return out.to(q.dtype), lse.to(torch.promote_types(q.dtype, torch.float32))


def reference_attention(q: Tensor, k: Tensor, v: Tensor, causal: bool = True,
                        key_padding_mask: Tensor | None = None,
                        scale: float | None = None) -> Tensor:
    """softmax(scale q k^T + mask) v in fp32 math, result in q's dtype (differentiable)."""
    return reference_attention_lse(q, k, v, causal, key_padding_mask, scale)[0]


def reference_attention_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor,
                                 key_padding_mask: Tensor | None, causal: bool, scale: float):
    """(dq, dk, dv) by the formulas in the module docstring, fp32 math, in the inputs' dtype."""
    B, Hq, S, D = q.shape
    g = Hq // k.shape[1]
    p, _ = _reference_probs(q, k, causal, key_padding_mask, scale)
    ct = p.dtype
    kf, vf = (t.to(ct).repeat_interleave(g, dim=1) for t in (k, v))
    do = dout.to(ct)
    ds = p * (do @ vf.transpose(-1, -2) - (do * (p @ vf)).sum(-1, keepdim=True))
    dq = scale * ds @ kf
    dk = (scale * ds.transpose(-1, -2) @ q.to(ct)).unflatten(1, (-1, g)).sum(2)
    dv = (p.transpose(-1, -2) @ do).unflatten(1, (-1, g)).sum(2)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


# --------------------------------------------------------------------------- kernels
def _dims(q, k):
    B, Hq, S, D = q.shape
    return B, Hq, k.shape[1], S, D


def _cpu_forward(q, k, v, mask, causal, scale):
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[:3], dtype=torch.float32)
    _ext._C.attention_forward(q.data_ptr(), k.data_ptr(), v.data_ptr(), _ext.ptr(mask),
                              out.data_ptr(), lse.data_ptr(), _ext.dtype_code(q), *_dims(q, k),
                              scale, causal, _ext.num_threads())
    return out, lse


def _cpu_backward(dout, q, k, v, mask, out, lse, causal, scale):
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    _ext._C.attention_backward(q.data_ptr(), k.data_ptr(), v.data_ptr(), _ext.ptr(mask),
                               out.data_ptr(), lse.data_ptr(), dout.data_ptr(), dq.data_ptr(),
                               dk.data_ptr(), dv.data_ptr(), _ext.dtype_code(q), *_dims(q, k),
                               scale, causal, _ext.num_threads())
    return dq, dk, dv


def _ref_forward(q, k, v, mask, causal, scale):
    return reference_attention_lse(q, k, v, causal, mask, scale)


def _ref_backward(dout, q, k, v, mask, out, lse, causal, scale):
    return reference_attention_backward(dout, q, k, v, mask, causal, scale)


def _triton_forward(q, k, v, mask, causal, scale):
    from pyengine.kernels.attention import attention_forward
    return attention_forward(q, k, v, mask, causal, scale)


def _triton_backward(dout, q, k, v, mask, out, lse, causal, scale):
    from pyengine.kernels.attention import attention_backward
    return attention_backward(dout, q, k, v, mask, out, lse, causal, scale)


FORWARD = {"ref": _ref_forward, "cpu": _cpu_forward, "triton": _triton_forward}
BACKWARD = {"ref": _ref_backward, "cpu": _cpu_backward, "triton": _triton_backward}


def _pick(backend, q):
    return backend if q.dtype in KERNEL_DTYPES else "ref"


# --------------------------------------------------------------------------- custom op
@torch.library.custom_op("pyengine::attention", mutates_args=())
def _attention(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None, causal: bool,
               scale: float, backend: str) -> tuple[Tensor, Tensor]:
    return FORWARD[_pick(backend, q)](q, k, v, key_padding_mask, causal, scale)


@_attention.register_fake
def _(q, k, v, key_padding_mask, causal, scale, backend):
    lse_dtype = torch.promote_types(q.dtype, torch.float32)
    return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=lse_dtype)


@torch.library.custom_op("pyengine::attention_backward", mutates_args=())
def _attention_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor,
                        key_padding_mask: Tensor | None, out: Tensor, lse: Tensor, causal: bool,
                        scale: float, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    return tuple(BACKWARD[_pick(backend, q)](dout, q, k, v, key_padding_mask, out, lse, causal,
                                             scale))


@_attention_backward.register_fake
def _(dout, q, k, v, key_padding_mask, out, lse, causal, scale, backend):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, mask, causal, scale, backend = inputs
    out, lse = output
    ctx.causal, ctx.scale, ctx.backend = causal, scale, backend
    ctx.save_for_backward(q, k, v, mask, out, lse)


def _attention_grad(ctx, dout, _dlse):
    q, k, v, mask, out, lse = ctx.saved_tensors
    dq, dk, dv = _attention_backward(dout.contiguous(), q, k, v, mask, out, lse, ctx.causal,
                                     ctx.scale, ctx.backend)
    return dq, dk, dv, None, None, None, None


_attention.register_autograd(_attention_grad, setup_context=_setup_context)


def _cast_to_q(q: Tensor, k: Tensor, v: Tensor):
    """Under torch.autocast all three run in the autocast dtype (like F.sdpa's fp32 -> bf16)."""
    if torch.is_autocast_enabled(q.device.type):
        dt = torch.get_autocast_dtype(q.device.type)
        return q.to(dt), k.to(dt), v.to(dt)
    return q, k, v


def _check(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"attention: q, k, v must be [B, H, S, D], got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    B, Hq, S, D = q.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[2:] != (S, D):
        raise ValueError(f"attention: k {tuple(k.shape)} and v {tuple(v.shape)} must be "
                         f"[{B}, Hkv, {S}, {D}] for q {tuple(q.shape)}")
    if k.shape[1] == 0 or Hq % k.shape[1]:
        raise ValueError(f"attention: q heads {Hq} must be a multiple of k/v heads {k.shape[1]}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in DTYPES:
        raise TypeError(f"attention: q, k, v must share a dtype among {DTYPES}, got {q.dtype}, "
                        f"{k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"attention: q, k, v on {q.device}, {k.device}, {v.device}")
    if key_padding_mask is not None and (key_padding_mask.dtype != torch.bool
                                         or tuple(key_padding_mask.shape) != (B, S)):
        raise ValueError(f"attention: key_padding_mask must be bool [{B}, {S}], got "
                         f"{key_padding_mask.dtype} {tuple(key_padding_mask.shape)}")


def attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = True,
              key_padding_mask: Tensor | None = None, scale: float | None = None,
              backend: str | None = None) -> Tensor:
    """softmax(scale q k^T + mask) v [B, Hq, S, D] in q's dtype; see the module docstring."""
    q, k, v = _cast_to_q(q, k, v)
    _check(q, k, v, key_padding_mask)
    scale = float(_scale(q, scale))
    chosen = resolve(OP, backend, q.device)
    if chosen == "ref":
        return reference_attention(q, k, v, causal, key_padding_mask, scale)
    if key_padding_mask is not None:
        key_padding_mask = key_padding_mask.to(q.device).contiguous()
    return _attention(q.contiguous(), k.contiguous(), v.contiguous(), key_padding_mask,
                      bool(causal), scale, chosen)[0]
