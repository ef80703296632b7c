"""Triton twin of the low-rank engine (csrc/lowrank_rows.h) for pyengine.ops.lora's
low_rank_pass, used by lora_linear and lora_mlp on the "triton" backend:

    proj (down):  u[N, r]   = keep * (x[N, K] * mask) @ w[r, K].T
    add (up_add): out[N, M] += alpha * (u[N, r] @ w[r, M]) * mask      (in place, one pass)

(grad, a reduction over N, stays a torch GEMM there.)  x / out fp32, bf16 or fp16, w / u
in the adapters' dtype, fp32 accumulation; mask optional bool [N, K] / [N, M] (dropout
keep-mask).  The rank is padded to a power of two >= 16 inside the tile (tl.dot's
minimum), masked on load.  Floor: memory-bound; down reads x once, up_add reads and
writes out once.  Tested on CPU with TRITON_INTERPRET=1; GPU speed has not been measured.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _down_kernel(x_ptr, w_ptr, mask_ptr, u_ptr, N, K, R, keep,
                 HAS_MASK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 BLOCK_R: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    ranks = tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        xm = (rows[:, None] < N) & (cols[None, :] < K)
        x = tl.load(x_ptr + rows[:, None] * K + cols[None, :], mask=xm, other=0.0).to(tl.float32)
        if HAS_MASK:
            keep_bits = tl.load(mask_ptr + rows[:, None] * K + cols[None, :], mask=xm, other=0)
            x = tl.where(keep_bits != 0, x, 0.0)
        wm = (ranks[:, None] < R) & (cols[None, :] < K)
        w = tl.load(w_ptr + ranks[:, None] * K + cols[None, :], mask=wm, other=0.0).to(tl.float32)
        acc += tl.dot(x, tl.trans(w), input_precision="ieee")
    um = (rows[:, None] < N) & (ranks[None, :] < R)
    tl.store(u_ptr + rows[:, None] * R + ranks[None, :],
             (acc * keep).to(u_ptr.dtype.element_ty), mask=um)


@triton.jit
def _up_add_kernel(out_ptr, u_ptr, w_ptr, mask_ptr, N, M, R, alpha,
                   HAS_MASK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_R: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    ranks = tl.arange(0, BLOCK_R)
    u = tl.load(u_ptr + rows[:, None] * R + ranks[None, :],
                mask=(rows[:, None] < N) & (ranks[None, :] < R), other=0.0).to(tl.float32)
    w = tl.load(w_ptr + ranks[:, None] * M + cols[None, :],
                mask=(ranks[:, None] < R) & (cols[None, :] < M), other=0.0).to(tl.float32)
    delta = tl.dot(u, w, input_precision="ieee") * alpha
    om = (rows[:, None] < N) & (cols[None, :] < M)
    offs = rows[:, None] * M + cols[None, :]
    if HAS_MASK:
        keep_bits = tl.load(mask_ptr + offs, mask=om, other=0)
        delta = tl.where(keep_bits != 0, delta, 0.0)
    out = tl.load(out_ptr + offs, mask=om, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, (out + delta).to(out_ptr.dtype.element_ty), mask=om)


def _rank_block(r: int) -> int:
    return max(16, triton.next_power_of_2(r))


def lora_down(x: torch.Tensor, w: torch.Tensor, mask: torch.Tensor | None,
              keep: float) -> torch.Tensor:
    """keep * (x * mask) @ w.T in w's dtype; x [N, K] and w [r, K] contiguous."""
    n, k = x.shape
    r = w.shape[0]
    u = torch.empty(n, r, dtype=w.dtype, device=x.device)
    block_n = 16
    _down_kernel[(triton.cdiv(n, block_n),)](
        x, w, x if mask is None else mask, u, n, k, r, keep, HAS_MASK=mask is not None,
        BLOCK_N=block_n, BLOCK_K=32, BLOCK_R=_rank_block(r))
    return u


def lora_up_add(out: torch.Tensor, u: torch.Tensor, w: torch.Tensor, alpha: float,
                mask: torch.Tensor | None) -> None:
    """out += alpha * (u @ w) * mask in place; out [N, M], u [N, r], w [r, M] contiguous."""
    n, m = out.shape
    block_n, block_m = 16, 32
    _up_add_kernel[(triton.cdiv(n, block_n), triton.cdiv(m, block_m))](
        out, u, w, out if mask is None else mask, n, m, w.shape[0], alpha,
        HAS_MASK=mask is not None, BLOCK_N=block_n, BLOCK_M=block_m,
        BLOCK_R=_rank_block(w.shape[0]))
