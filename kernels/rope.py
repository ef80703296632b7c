"""Triton RoPE on q and k (twin of csrc/rope.h; see pyengine/ops/rope.py).

    forward:  y1 = x1 c1 - x2 s1,  y2 = x2 c2 + x1 s2      (x * cos + rotate_half(x) * sin)
    backward: dx1 = dy1 c1 + dy2 s2,  dx2 = dy2 c2 - dy1 s1

One program per row (b, h, s) of D elements; any B/H/S strides, D contiguous; fp32 math.
Memory-bound.  Tested on CPU under TRITON_INTERPRET=1; GPU speed not measured.
"""
import torch
import triton
import triton.language as tl


@triton.jit
def _kernel(x_ptr, y_ptr, cos_ptr, sin_ptr, heads, seq, half, cos_sb, sb, sh, ss, osb, osh, oss,
            BACKWARD: tl.constexpr, BLOCK: tl.constexpr):
    r = tl.program_id(0)
    b = r // (heads * seq)
    h = (r // seq) % heads
    p = r % seq
    offs = tl.arange(0, BLOCK)
    mask = offs < half
    x = x_ptr + b * sb + h * sh + p * ss
    y = y_ptr + b * osb + h * osh + p * oss
    cs = b * cos_sb + p * 2 * half
    x1 = tl.load(x + offs, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x + half + offs, mask=mask, other=0.0).to(tl.float32)
    c1 = tl.load(cos_ptr + cs + offs, mask=mask, other=0.0).to(tl.float32)
    c2 = tl.load(cos_ptr + cs + half + offs, mask=mask, other=0.0).to(tl.float32)
    s1 = tl.load(sin_ptr + cs + offs, mask=mask, other=0.0).to(tl.float32)
    s2 = tl.load(sin_ptr + cs + half + offs, mask=mask, other=0.0).to(tl.float32)
    if BACKWARD:
        y1 = x1 * c1 + x2 * s2
        y2 = x2 * c2 - x1 * s1
    else:
        y1 = x1 * c1 - x2 * s1
        y2 = x2 * c2 + x1 * s2
    tl.store(y + offs, y1.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(y + half + offs, y2.to(y_ptr.dtype.element_ty), mask=mask)


def _one(x, cos, sin, backward):
    y = torch.empty_like(x)
    B, H, S, D = x.shape
    _kernel[(B * H * S,)](x, y, cos, sin, H, S, D // 2, cos.stride(0) if cos.shape[0] > 1 else 0,
                          *x.stride()[:3], *y.stride()[:3], BACKWARD=backward,
                          BLOCK=triton.next_power_of_2(D // 2))
    return y


def rope(q, k, cos, sin, backward=False):
    """(q', k'); q, k [B, H, S, D] with D contiguous, cos/sin [B or 1, S, D] contiguous."""
    return _one(q, cos, sin, backward), _one(k, cos, sin, backward)
