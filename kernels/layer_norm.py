"""Triton LayerNorm(+residual) forward/backward (twin of csrc/norms.h; see pyengine/ops/norms.py).

    s = x + residual,  mean, rstd = rsqrt(var(s) + eps),  y = (s - mean) * rstd * w + b
    xh = (s - mean) * rstd,  g = dy * w,  dx = rstd * (g - mean(g) - xh * mean(g * xh)) + ds
    dweight = sum_rows dy * xh,  dbias = sum_rows dy

One program per block of ROWS rows, a row in one BLOCK >= cols; fp32 statistics.
dweight / dbias: per-program fp32 partials summed by torch (deterministic, no atomics).
Memory-bound.  Tested on CPU under TRITON_INTERPRET=1; GPU speed not measured.
"""
import torch
import triton
import triton.language as tl

ROWS = 4


@triton.jit
def _forward_kernel(x_ptr, r_ptr, w_ptr, b_ptr, y_ptr, s_ptr, mean_ptr, rstd_ptr, n_rows, cols,
                    eps, HAS_RES: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    mask = offs < cols
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + offs, mask=mask, other=0.0).to(tl.float32)
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
            mean = tl.sum(v, axis=0) / cols
            c = tl.where(mask, v - mean, 0.0)
            rstd = 1.0 / tl.sqrt(tl.sum(c * c, axis=0) / cols + eps)
            tl.store(mean_ptr + row, mean)
            tl.store(rstd_ptr + row, rstd)
            tl.store(y_ptr + base + offs, (c * rstd * w + b).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _backward_kernel(dy_ptr, ds_ptr, s_ptr, w_ptr, mean_ptr, rstd_ptr, dx_ptr, dw_ptr, db_ptr,
                     n_rows, cols, HAS_DS: tl.constexpr, ROWS: tl.constexpr,
                     BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    mask = offs < cols
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK], dtype=tl.float32)
    db = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(ROWS):
        row = tl.program_id(0) * ROWS + i
        if row < n_rows:
            base = row * cols
            mean = tl.load(mean_ptr + row)
            rstd = tl.load(rstd_ptr + row)
            s = tl.load(s_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
            xh = tl.where(mask, (s - mean) * rstd, 0.0)
            dy = tl.load(dy_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
            g = dy * w
            dw += dy * xh
            db += dy
            dx = rstd * (g - tl.sum(g, axis=0) / cols - xh * (tl.sum(g * xh, axis=0) / cols))
            if HAS_DS:
                dx += tl.load(ds_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
            tl.store(dx_ptr + base + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
    tl.store(dw_ptr + tl.program_id(0) * cols + offs, dw, mask=mask)
    tl.store(db_ptr + tl.program_id(0) * cols + offs, db, mask=mask)


def layer_norm_forward(x, weight, bias, residual, eps):
    """(y, s or empty, mean fp32 [rows], rstd fp32 [rows]); all contiguous, one dtype."""
    cols = x.shape[-1]
    rows = x.numel() // cols
    y = torch.empty_like(x)
    s = torch.empty_like(x) if residual is not None else x.new_empty(0)
    mean, rstd = (torch.empty(rows, device=x.device, dtype=torch.float32) for _ in range(2))
    _forward_kernel[(triton.cdiv(rows, ROWS),)](
        x, x if residual is None else residual, weight, bias, y, y if residual is None else s,
        mean, rstd, rows, cols, eps, HAS_RES=residual is not None, ROWS=ROWS,
        BLOCK=triton.next_power_of_2(cols))
    return y, s, mean, rstd


def layer_norm_backward(dy, ds, s, weight, mean, rstd):
    """(dx, dweight fp32, dbias fp32); all contiguous."""
    cols = s.shape[-1]
    rows = s.numel() // cols
    programs = triton.cdiv(rows, ROWS)
    dx = torch.empty_like(s)
    dw, db = (torch.empty(programs, cols, device=s.device, dtype=torch.float32) for _ in range(2))
    _backward_kernel[(programs,)](dy, dy if ds is None else ds, s, weight, mean, rstd, dx, dw, db,
                                  rows, cols, HAS_DS=ds is not None, ROWS=ROWS,
                                  BLOCK=triton.next_power_of_2(cols))
    return dx, dw.sum(0), db.sum(0)
