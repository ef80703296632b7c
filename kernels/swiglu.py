"""Triton SwiGLU forward/backward (twin of csrc/swiglu.h; see pyengine/ops/swiglu.py).

    h = silu(g) * u;   du = dh * silu(g);   dg = dh * u * s * (1 + g * (1 - s)),  s = sigmoid(g)

1-D blocks over n contiguous elements, fp32 math, stored in the input dtype.  Memory-bound:
forward moves 3n elements, backward 5n (6n when the recomputed h is asked for).  Tested on
CPU under TRITON_INTERPRET=1; GPU speed not measured.
"""
import torch
import triton
import triton.language as tl

BLOCK = 1024


@triton.jit
def _forward_kernel(g_ptr, u_ptr, h_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    h = g * tl.sigmoid(g) * u
    tl.store(h_ptr + offs, h.to(h_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _backward_kernel(dh_ptr, g_ptr, u_ptr, dg_ptr, du_ptr, h_ptr, n, WRITE_H: tl.constexpr,
                     BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    dh = tl.load(dh_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(g)
    silu = g * s
    out_ty = dg_ptr.dtype.element_ty
    tl.store(du_ptr + offs, (dh * silu).to(out_ty), mask=mask)
    tl.store(dg_ptr + offs, (dh * u * s * (1.0 + g * (1.0 - s))).to(out_ty), mask=mask)
    if WRITE_H:
        tl.store(h_ptr + offs, (silu * u).to(out_ty), mask=mask)


def swiglu_forward(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """h = silu(g) * u; g, u contiguous, same shape and dtype."""
    h = torch.empty_like(g)
    n = g.numel()
    _forward_kernel[(triton.cdiv(n, BLOCK),)](g, u, h, n, BLOCK=BLOCK)
    return h


def swiglu_backward(dh: torch.Tensor, g: torch.Tensor, u: torch.Tensor, want_h: bool = False):
    """(dg, du, h or None); all contiguous, same shape and dtype."""
    dg, du = torch.empty_like(g), torch.empty_like(g)
    h = torch.empty_like(g) if want_h else None
    n = g.numel()
    _backward_kernel[(triton.cdiv(n, BLOCK),)](dh, g, u, dg, du, dg if h is None else h, n,
                                               WRITE_H=want_h, BLOCK=BLOCK)
    return dg, du, h
