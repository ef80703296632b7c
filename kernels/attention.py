"""Triton flash attention for training, forward + backward (twin of csrc/attention.h; see
pyengine/ops/attention.py for the math and the contract).

Forward: one program per (query block, batch * q head), online softmax over key blocks
(skipping those above the diagonal when causal), writes out and lse (fp32).  Backward (FA2):
delta = rowsum(dout * out); one program per (key block, batch * kv head) accumulates dk, dv
over the GQA group's heads and the query blocks in order; one per (query block, batch *
q head) accumulates dq over key blocks.  No atomics, so results are deterministic.  A row
with no key to attend to gives out 0, lse -inf and zero gradients.  All math in fp32 like the
CPU kernel (tiles upcast on load, P kept fp32, input_precision="ieee": no tf32), as the
other kernels here do; a bf16 tensor-core variant is left for when a GPU can test it.
Tested on CPU under TRITON_INTERPRET=1 with tiny shapes; GPU speed not measured.
"""

import torch
import triton
import triton.language as tl

BLOCK_M, BLOCK_N = 32, 32


@triton.jit
def _scores(q, k_ptrs, kv_valid, offs_m, offs_n, mask_ptr, b, S, scale,
            CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr):
    """scale * q k^T of one tile, -inf where masked; and the validity of each (row, key)."""
    k = tl.load(k_ptrs, mask=kv_valid, other=0.0).to(tl.float32)
    s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
    ok = (offs_n < S)[None, :] & (offs_m < S)[:, None]
    if CAUSAL:
        ok = ok & (offs_n[None, :] <= offs_m[:, None])
    if HAS_MASK:
        km = tl.load(mask_ptr + b * S + offs_n, mask=offs_n < S, other=0)
        ok = ok & (km != 0)[None, :]
    return tl.where(ok, s, float("-inf")), ok


@triton.jit
def _forward_kernel(q_ptr, k_ptr, v_ptr, mask_ptr, o_ptr, lse_ptr, S, D, Hq, Hkv, scale,
                    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_m, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // Hq, bh % Hq
    kvh = h // (Hq // Hkv)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    q_base = bh * S * D
    kv_base = (b * Hkv + kvh) * S * D
    row_ok = (offs_m < S)[:, None] & d_ok[None, :]
    q = tl.load(q_ptr + q_base + offs_m[:, None] * D + offs_d[None, :], mask=row_ok,
                other=0.0).to(tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    end = tl.minimum(S, (pid_m + 1) * BLOCK_M) if CAUSAL else S
    for start_n in range(0, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kv_ok = (offs_n < S)[:, None] & d_ok[None, :]
        kv_off = kv_base + offs_n[:, None] * D + offs_d[None, :]
        s, ok = _scores(q, k_ptr + kv_off, kv_ok, offs_m, offs_n, mask_ptr, b, S, scale,
                        CAUSAL, HAS_MASK)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.where(ok, tl.exp(s - m_safe[:, None]), 0.0)
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_ptr + kv_off, mask=kv_ok, other=0.0).to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        m_i = m_new
    has = l_i > 0
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    tl.store(o_ptr + q_base + offs_m[:, None] * D + offs_d[None, :],
             out.to(o_ptr.dtype.element_ty), mask=row_ok)
    lse = tl.where(has, m_i + tl.log(tl.where(has, l_i, 1.0)), float("-inf"))
    tl.store(lse_ptr + bh * S + offs_m, lse, mask=offs_m < S)


@triton.jit
def _probs_dscores(q, do, k_ptrs, v_ptrs, kv_ok, offs_m, offs_n, mask_ptr, lse_ptr, delta_ptr,
                   b, row_base, S, scale, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr):
    """P and dS = P * (dO V^T - delta) of one tile, P recomputed from lse."""
    s, ok = _scores(q, k_ptrs, kv_ok, offs_m, offs_n, mask_ptr, b, S, scale, CAUSAL, HAS_MASK)
    lse = tl.load(lse_ptr + row_base + offs_m, mask=offs_m < S, other=float("-inf"))
    lse_safe = tl.where(lse == float("-inf"), 0.0, lse)
    p = tl.where(ok, tl.exp(s - lse_safe[:, None]), 0.0)
    v = tl.load(v_ptrs, mask=kv_ok, other=0.0).to(tl.float32)
    dp = tl.dot(do, tl.trans(v), input_precision="ieee")
    delta = tl.load(delta_ptr + row_base + offs_m, mask=offs_m < S, other=0.0)
    return p, p * (dp - delta[:, None])


@triton.jit
def _dkdv_kernel(q_ptr, k_ptr, v_ptr, mask_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
                 S, D, Hq, Hkv, scale, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_n, bkv = tl.program_id(0), tl.program_id(1)
    b, kvh = bkv // Hkv, bkv % Hkv
    G = Hq // Hkv
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    kv_ok = (offs_n < S)[:, None] & d_ok[None, :]
    kv_off = bkv * S * D + offs_n[:, None] * D + offs_d[None, :]
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    start = (pid_n * BLOCK_N) // BLOCK_M * BLOCK_M if CAUSAL else 0
    for g in range(0, G):
        qh = b * Hq + kvh * G + g
        for start_m in range(start, S, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            row_ok = (offs_m < S)[:, None] & d_ok[None, :]
            q_off = qh * S * D + offs_m[:, None] * D + offs_d[None, :]
            q = tl.load(q_ptr + q_off, mask=row_ok, other=0.0).to(tl.float32)
            do = tl.load(do_ptr + q_off, mask=row_ok, other=0.0).to(tl.float32)
            p, ds = _probs_dscores(q, do, k_ptr + kv_off, v_ptr + kv_off, kv_ok, offs_m, offs_n,
                                   mask_ptr, lse_ptr, delta_ptr, b, qh * S, S, scale, CAUSAL,
                                   HAS_MASK)
            dv += tl.dot(tl.trans(p), do, input_precision="ieee")
            dk += tl.dot(tl.trans(ds), q, input_precision="ieee")
    tl.store(dk_ptr + kv_off, (dk * scale).to(dk_ptr.dtype.element_ty), mask=kv_ok)
    tl.store(dv_ptr + kv_off, dv.to(dv_ptr.dtype.element_ty), mask=kv_ok)


@triton.jit
def _dq_kernel(q_ptr, k_ptr, v_ptr, mask_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr,
               S, D, Hq, Hkv, scale, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_m, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // Hq, bh % Hq
    kvh = h // (Hq // Hkv)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    row_ok = (offs_m < S)[:, None] & d_ok[None, :]
    q_off = bh * S * D + offs_m[:, None] * D + offs_d[None, :]
    q = tl.load(q_ptr + q_off, mask=row_ok, other=0.0).to(tl.float32)
    do = tl.load(do_ptr + q_off, mask=row_ok, other=0.0).to(tl.float32)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    end = tl.minimum(S, (pid_m + 1) * BLOCK_M) if CAUSAL else S
    for start_n in range(0, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kv_ok = (offs_n < S)[:, None] & d_ok[None, :]
        kv_off = (b * Hkv + kvh) * S * D + offs_n[:, None] * D + offs_d[None, :]
        p, ds = _probs_dscores(q, do, k_ptr + kv_off, v_ptr + kv_off, kv_ok, offs_m, offs_n,
                               mask_ptr, lse_ptr, delta_ptr, b, bh * S, S, scale, CAUSAL,
                               HAS_MASK)
        k = tl.load(k_ptr + kv_off, mask=kv_ok, other=0.0).to(tl.float32)
        dq += tl.dot(ds, k, input_precision="ieee")
    tl.store(dq_ptr + q_off, (dq * scale).to(dq_ptr.dtype.element_ty), mask=row_ok)


def _common(q, k, mask):
    B, Hq, S, D = q.shape
    block_d = max(16, triton.next_power_of_2(D))
    mask_arg = mask.to(torch.int8) if mask is not None else q.new_empty(1, dtype=torch.int8)
    return B, Hq, k.shape[1], S, D, block_d, mask_arg


def attention_forward(q, k, v, mask, causal: bool, scale: float):
    """(out, lse fp32 [B, Hq, S]); q/k/v contiguous [B, H, S, D], mask bool [B, S] or None."""
    B, Hq, Hkv, S, D, block_d, m = _common(q, k, mask)
    out = torch.empty_like(q)
    lse = torch.empty(B, Hq, S, dtype=torch.float32, device=q.device)
    _forward_kernel[(triton.cdiv(S, BLOCK_M), B * Hq)](
        q, k, v, m, out, lse, S, D, Hq, Hkv, scale, CAUSAL=causal, HAS_MASK=mask is not None,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=block_d)
    return out, lse


def attention_backward(dout, q, k, v, mask, out, lse, causal: bool, scale: float):
    """(dq, dk, dv) with P recomputed from lse; all contiguous."""
    B, Hq, Hkv, S, D, block_d, m = _common(q, k, mask)
    delta = (dout.float() * out.float()).sum(-1)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    flags = dict(CAUSAL=causal, HAS_MASK=mask is not None, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
                 BLOCK_D=block_d)
    _dkdv_kernel[(triton.cdiv(S, BLOCK_N), B * Hkv)](
        q, k, v, m, dout, lse, delta, dk, dv, S, D, Hq, Hkv, scale, **flags)
    _dq_kernel[(triton.cdiv(S, BLOCK_M), B * Hq)](
        q, k, v, m, dout, lse, delta, dq, S, D, Hq, Hkv, scale, **flags)
    return dq, dk, dv
