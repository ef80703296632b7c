"""Triton batched gather-LoRA (twin of csrc/lora_gather.h; see pyengine/ops/lora_gather.py).

    y[r, :] += b[idx[r]] @ (a[idx[r]] @ x[r, :])      rows with idx[r] >= 0 (-1: base only)

One program per (row, block of BLOCK_N outputs): it loads the row's adapter index, computes
t = a[idx] @ x[r] (rank values, fp32, K in BLOCK_K steps) and then adds the b block @ t into
y.  t is recomputed per N block (Punica's BGMV shape; rank * K extra flops per block, cheap
next to reading b).  x [R, K], a [n_adapters, rank, K], b [n_adapters, N, rank], y [R, N]:
fp32, contiguous; idx int64.  Floor: each row reads its adapter's a and b: memory-bound.
Tested on CPU under TRITON_INTERPRET=1; GPU speed not measured.
"""
import torch
import triton
import triton.language as tl


@triton.jit
def _kernel(x_ptr, idx_ptr, a_ptr, b_ptr, y_ptr, K, N, RANK, BLOCK_R: tl.constexpr,
            BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    row = tl.program_id(0)
    ad = tl.load(idx_ptr + row)
    if ad >= 0:
        offs_r = tl.arange(0, BLOCK_R)
        mask_r = offs_r < RANK
        a_base = a_ptr + ad * RANK * K
        t = tl.zeros([BLOCK_R], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < K
            xv = tl.load(x_ptr + row * K + offs_k, mask=mask_k, other=0.0)
            av = tl.load(a_base + offs_r[:, None] * K + offs_k[None, :],
                         mask=mask_r[:, None] & mask_k[None, :], other=0.0)
            t += tl.sum(av * xv[None, :], axis=1)
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        bv = tl.load(b_ptr + ad * N * RANK + offs_n[:, None] * RANK + offs_r[None, :],
                     mask=mask_n[:, None] & mask_r[None, :], other=0.0)
        y = y_ptr + row * N + offs_n
        tl.store(y, tl.load(y, mask=mask_n) + tl.sum(bv * t[None, :], axis=1), mask=mask_n)


def lora_gather_add(y: torch.Tensor, x: torch.Tensor, idx: torch.Tensor, a: torch.Tensor,
                    b: torch.Tensor) -> torch.Tensor:
    """y += the per-row deltas, in place (y returned); shapes and range checked by the op."""
    R, K = x.shape
    _, rank, _ = a.shape
    N = b.shape[1]
    if R == 0 or N == 0 or rank == 0:
        return y
    block_n = min(64, triton.next_power_of_2(N))
    _kernel[(R, triton.cdiv(N, block_n))](x, idx, a, b, y, K, N, rank,
                                          BLOCK_R=triton.next_power_of_2(rank),
                                          BLOCK_K=min(64, triton.next_power_of_2(K)),
                                          BLOCK_N=block_n)
    return y
