"""Cross-entropy rows in Triton: the GPU row kernel of pyengine.ops.fused_linear_cross_entropy.

Fused: for each logits row, max/logsumexp, the loss (label smoothing, z-loss, tanh
softcap) and, optionally, d loss / d logits written in place over the row (the op's own
chunk buffer, never a caller's tensor).  torch does the three GEMMs around it.  Same math
as the C++ row kernel (csrc/cross_entropy.h); per row i with target t, z = c*tanh(l/c)
(or z = l when softcap is off), eps = label_smoothing, p = softmax(z):
  lse  = log sum_j exp(z_j)
  loss = (1-eps)(lse - z_t) + eps(lse - mean_j z_j) + z_loss * lse^2
  grad_j = s_i [ p_j (1 + 2 z_loss lse) - eps/V - (1-eps)[j==t] ] * (1 - (z_j/c)^2)
with s_i = scale * row_scale[i].  Ignored rows (t == ignore_index): loss 0, grad 0.

Shapes/dtypes: logits [n, V] fp32/bf16/fp16, any row stride, contiguous inner dim;
target [n] int64; loss [n] fp32 (output); row_scale optional [n] fp32.  All math in fp32.
One program per row; it sweeps V in BLOCK-wide tiles twice (online max/sum-exp, then the
gradient), so any V works and V need not be a multiple of BLOCK.  Limits: rows are
independent, so a tiny n leaves a GPU mostly idle; V up to 2^31.
Floor (bytes): read n*V logits twice (once more for the gradient) and write them once,
~6 flops and one or two exps per element; small next to the 2*n*V*H-flop GEMMs around it.
GPU speed has not been measured (no GPU here); correctness is tested with TRITON_INTERPRET=1.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

MAX_BLOCK = 4096  # widest tile; smaller V uses next_power_of_2(V)
LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _softcapped(x, softcap, SOFTCAP: tl.constexpr):
    """c * tanh(x / c) via exp (saturates cleanly at +-c); identity when SOFTCAP is off."""
    if SOFTCAP:
        x = softcap * (1.0 - 2.0 / (tl.exp(2.0 * x / softcap) + 1.0))
    return x


@triton.jit
def _ce_rows_kernel(logits_ptr, stride_row, target_ptr, loss_ptr, row_scale_ptr, V,
                    ignore_index, label_smoothing, z_loss, softcap, scale,
                    HAS_ROW_SCALE: tl.constexpr, SOFTCAP: tl.constexpr,
                    WRITE_GRAD: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    t = tl.load(target_ptr + row)
    cols0 = tl.arange(0, BLOCK)
    if t == ignore_index:
        tl.store(loss_ptr + row, 0.0)
        if WRITE_GRAD:
            for start in range(0, V, BLOCK):
                cols = start + cols0
                zero = tl.zeros([BLOCK], dtype=tl.float32)
                tl.store(row_ptr + cols, zero.to(logits_ptr.dtype.element_ty), mask=cols < V)
    else:
        # pass 1: online max and sum of exp, plus sum of z for label smoothing
        m = float("-inf")
        sum_exp = 0.0
        sum_z = 0.0
        for start in range(0, V, BLOCK):
            cols = start + cols0
            mask = cols < V
            x = tl.load(row_ptr + cols, mask=mask, other=0.0).to(tl.float32)
            z = tl.where(mask, _softcapped(x, softcap, SOFTCAP), float("-inf"))
            m_new = tl.maximum(m, tl.max(z, axis=0))
            sum_exp = sum_exp * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
            sum_z += tl.sum(tl.where(mask, z, 0.0), axis=0)
            m = m_new
        lse = m + tl.log(sum_exp)
        z_t = _softcapped(tl.load(row_ptr + t).to(tl.float32), softcap, SOFTCAP)
        loss = ((1.0 - label_smoothing) * (lse - z_t)
                + label_smoothing * (lse - sum_z / V) + z_loss * lse * lse)
        tl.store(loss_ptr + row, loss)
        if WRITE_GRAD:
            # pass 2: gradient over the same tiles, in place
            s = scale
            if HAS_ROW_SCALE:
                s = s * tl.load(row_scale_ptr + row)
            p_scale = s * (1.0 + 2.0 * z_loss * lse)
            uniform = s * label_smoothing / V
            one_hot = s * (1.0 - label_smoothing)
            for start in range(0, V, BLOCK):
                cols = start + cols0
                mask = cols < V
                x = tl.load(row_ptr + cols, mask=mask, other=0.0).to(tl.float32)
                z = _softcapped(x, softcap, SOFTCAP)
                g = p_scale * tl.exp(z - lse) - uniform - tl.where(cols == t, one_hot, 0.0)
                if SOFTCAP:
                    g = g * (1.0 - (z / softcap) * (z / softcap))
                tl.store(row_ptr + cols, g.to(logits_ptr.dtype.element_ty), mask=mask)


def _check(logits, target, loss, row_scale):
    name = "pyengine.kernels.cross_entropy.ce_rows"
    if logits.dim() != 2 or logits.dtype not in LOGIT_DTYPES:
        raise ValueError(f"{name}: logits must be 2-D fp32/bf16/fp16, got "
                         f"{tuple(logits.shape)} {logits.dtype}")
    if logits.shape[1] > 1 and logits.stride(1) != 1:
        raise ValueError(f"{name}: logits inner dim must be contiguous, strides {logits.stride()}")
    n = logits.shape[0]
    wanted = {"target": (target, torch.int64), "loss": (loss, torch.float32),
              "row_scale": (row_scale, torch.float32)}
    for what, (t, dtype) in wanted.items():
        if t is None:
            continue
        if tuple(t.shape) != (n,) or t.dtype != dtype or (n > 1 and t.stride(0) != 1):
            raise ValueError(f"{name}: {what} must be contiguous [{n}] {dtype}, got "
                             f"{tuple(t.shape)} {t.dtype} strides {t.stride()}")
        if t.device != logits.device:
            raise ValueError(f"{name}: {what} is on {t.device}, logits on {logits.device}")


def ce_rows(logits: torch.Tensor, target: torch.Tensor, loss: torch.Tensor, *,
            ignore_index: int, label_smoothing: float, z_loss: float, softcap: float,
            scale: float, row_scale: Optional[torch.Tensor], write_grad: bool) -> None:
    """Per-row loss into `loss`; when write_grad, d(sum_i s_i loss_i)/d logits over
    `logits` in place (s_i = scale * row_scale[i]).  softcap 0.0 = off."""
    _check(logits, target, loss, row_scale)
    n, vocab = logits.shape
    if n == 0:
        return
    block = min(MAX_BLOCK, triton.next_power_of_2(vocab))
    _ce_rows_kernel[(n,)](
        logits, logits.stride(0), target, loss, loss if row_scale is None else row_scale,
        vocab, int(ignore_index), float(label_smoothing), float(z_loss),
        float(softcap) if softcap > 0 else 1.0, float(scale),
        HAS_ROW_SCALE=row_scale is not None, SOFTCAP=softcap > 0, WRITE_GRAD=bool(write_grad),
        BLOCK=block, num_warps=8 if block >= 2048 else 4)
