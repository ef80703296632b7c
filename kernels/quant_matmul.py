"""Triton twin of pyengine.ops.quant_matmul: y = x @ dequant(W).T + bias.

Dequantize-in-kernel: each program owns a [BLOCK_M, BLOCK_N] tile of y and walks K one
quant block at a time, decoding the weight block in registers as pyengine.quant_formats
defines it (q8_0: int8 * d; q4_0: (nibble - zero) * d; nf4: codebook[nibble] * d; nibble j
of a block is the low nibble of byte j for j < B/2, else the high nibble of byte j - B/2)
and accumulating tl.dot in fp32.  Quant
bytes are in QuantizedWeight's interleaved layout: byte j of block l of a 16-block group
(n blocks in that group) is at (j // 4 * n + l) * 4 + j % 4 from the group's start.
x [M, K] fp32/bf16, qs uint8 [N, K*bits/8], scales fp16 [N, K/B], bias fp32 [N] or None;
y [M, N] in x's dtype.  Floor: weight bytes once per BLOCK_M rows of x; 2*M*N*K flops.
Tested on CPU under TRITON_INTERPRET=1; GPU speed has not been measured.
"""
import torch
import triton
import triton.language as tl

from pyengine.quant_formats import FORMATS


@triton.jit
def _quant_matmul_kernel(x_ptr, qs_ptr, sc_ptr, code_ptr, bias_ptr, y_ptr, M, N, K,
                         B: tl.constexpr, QB: tl.constexpr, BYTES: tl.constexpr,
                         ZERO: tl.constexpr, CODEBOOK: tl.constexpr,
                         HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    j = tl.arange(0, B)
    mask_m = rm < M
    mask_n = rn < N
    n_blocks = K // B
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, n_blocks):
        x = tl.load(x_ptr + rm[:, None] * K + kb * B + j[None, :], mask=mask_m[:, None],
                    other=0.0).to(tl.float32)
        n_in_group = tl.minimum(16, n_blocks - (kb // 16) * 16)
        row = qs_ptr + rn[:, None] * (n_blocks * QB) + (kb // 16) * 16 * QB + (kb % 16) * 4
        d = tl.load(sc_ptr + rn * n_blocks + kb, mask=mask_n, other=0.0).to(tl.float32)
        if BYTES:  # 8-bit signed quants
            byte_off = (j // 4) * n_in_group * 4 + j % 4
            q = tl.load(row + byte_off[None, :], mask=mask_n[:, None], other=0).to(tl.int8, bitcast=True)
            w = q.to(tl.float32)
        else:
            half = B // 2
            jb = j % half
            byte_off = (jb // 4) * n_in_group * 4 + jb % 4
            byte = tl.load(row + byte_off[None, :], mask=mask_n[:, None], other=0).to(tl.int32)
            nib = (byte >> ((j // half) * 4)[None, :]) & 15
            if CODEBOOK:
                w = tl.load(code_ptr + nib)
            else:
                w = (nib - ZERO).to(tl.float32)
        w = w * d[:, None]
        acc += tl.dot(x, tl.trans(w))
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=mask_n, other=0.0)[None, :]
    tl.store(y_ptr + rm[:, None] * N + rn[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_n[None, :])


def quant_matmul(x, qs, scales, fmt, bias=None, block_m=16, block_n=32):
    m, k = x.shape
    n = qs.shape[0]
    spec = FORMATS[fmt]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    code = torch.tensor(spec.codebook or (0.0,), dtype=torch.float32, device=x.device)
    bias32 = None if bias is None else bias.float().contiguous()
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _quant_matmul_kernel[grid](x, qs, scales, code, bias32 if bias32 is not None else y, y,
                               m, n, k, B=spec.block, QB=spec.quant_bytes,
                               BYTES=spec.bits == 8, ZERO=spec.zero,
                               CODEBOOK=spec.codebook is not None,
                               HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=block_n)
    return y
