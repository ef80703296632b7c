"""Triton RMSNorm(+residual) forward/backward (twin of csrc/norms.h; see pyengine/ops/norms.py).

    s = x + residual,  rstd = rsqrt(mean(s^2) + eps),  y = weight * round(s * rstd)
    dx = rstd * (dy*w - n * mean(dy*w * n)) + ds,   n = s * rstd;   dweight = sum_rows dy * round(n)

One program per block of ROWS rows, a row in one BLOCK >= cols; fp32 statistics.  dweight:
each program writes its fp32 partial, summed over programs by torch (fixed order, no
atomics: deterministic).  Memory-bound.  Tested on CPU under TRITON_INTERPRET=1; GPU
speed not measured.
"""
import torch
import triton
import triton.language as tl

ROWS = 4


@triton.jit
def _forward_kernel(x_ptr, r_ptr, w_ptr, y_ptr, s_ptr, rstd_ptr, n_rows, cols, eps,
                    HAS_RES: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    mask = offs < cols
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    for i in range(ROWS):
        row = tl.program_id(0) * ROWS + i
        if row < n_rows:
            base = row * cols
            v = tl.load(x_ptr + base + offs, mask=mask, other=0.0)
            if HAS_RES:
                v = (v.to(tl.float32) + tl.load(r_ptr + base + offs, mask=mask,
                                                other=0.0).to(tl.float32)).to(v.dtype)
                tl.store(s_ptr + base + offs, v, mask=mask)
            v = v.to(tl.float32)
            rstd = 1.0 / tl.sqrt(tl.sum(v * v, axis=0) / cols + eps)
            tl.store(rstd_ptr + row, rstd)
            n = (v * rstd).to(y_ptr.dtype.element_ty).to(tl.float32)
            tl.store(y_ptr + base + offs, (w * n).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _backward_kernel(dy_ptr, ds_ptr, s_ptr, w_ptr, rstd_ptr, dx_ptr, dw_ptr, n_rows, cols,
                     HAS_DS: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    mask = offs < cols
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(ROWS):
        row = tl.program_id(0) * ROWS + i
        if row < n_rows:
            base = row * cols
            rstd = tl.load(rstd_ptr + row)
            n = tl.load(s_ptr + base + offs, mask=mask, other=0.0).to(tl.float32) * rstd
            dy = tl.load(dy_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
            dn = dy * w
            dw += dy * n.to(dx_ptr.dtype.element_ty).to(tl.float32)
            dx = rstd * (dn - n * (tl.sum(dn * n, axis=0) / cols))
            if HAS_DS:
                dx += tl.load(ds_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
            tl.store(dx_ptr + base + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
    tl.store(dw_ptr + tl.program_id(0) * cols + offs, dw, mask=mask)


def rms_norm_forward(x, weight, residual, eps):
    """(y, s or empty, rstd fp32 [rows]); all contiguous, one dtype."""
    cols = x.shape[-1]
    rows = x.numel() // cols
    y = torch.empty_like(x)
    s = torch.empty_like(x) if residual is not None else x.new_empty(0)
    rstd = torch.empty(rows, device=x.device, dtype=torch.float32)
    _forward_kernel[(triton.cdiv(rows, ROWS),)](
        x, x if residual is None else residual, weight, y, y if residual is None else s, rstd,
        rows, cols, eps, HAS_RES=residual is not None, ROWS=ROWS,
        BLOCK=triton.next_power_of_2(cols))
    return y, s, rstd


def rms_norm_backward(dy, ds, s, weight, rstd):
    """(dx, dweight fp32); all contiguous."""
    cols = s.shape[-1]
    rows = s.numel() // cols
    programs = triton.cdiv(rows, ROWS)
    dx = torch.empty_like(s)
    partial = torch.empty(programs, cols, device=s.device, dtype=torch.float32)
    _backward_kernel[(programs,)](dy, dy if ds is None else ds, s, weight, rstd, dx, partial,
                                  rows, cols, HAS_DS=ds is not None, ROWS=ROWS,
                                  BLOCK=triton.next_power_of_2(cols))
    return dx, partial.sum(0)
