"""Batched gather-LoRA: each row gets the delta of its own adapter from a stack of adapters
(S-LoRA / Punica's BGMV), for serving many adapters on one base without merging.

    delta[r] = lora_b[idx[r]] @ (lora_a[idx[r]] @ x[r])      (0 where idx[r] == -1)

x [R, K] (fp32; a bf16 / fp16 x is converted to fp32 first), lora_a [n_adapters, rank, K] and
lora_b [n_adapters, N, rank] fp32 (the adapter bank: scaling folded into b, ranks zero
padded), idx [R] int64 in [-1, n_adapters); result [R, N] fp32.
Fused (cpu, triton): the gather of each row's adapter and both skinny products; no
[R, rank, K] / [R, N, rank] gathered copies (the reference makes them).  The cpu kernel
groups rows by adapter, so each used adapter's A and B are read once per call; same bits
on any thread count.  Floor: bytes 4 (n_used rank (K + N) + R K + R N) with n_used the
adapters some row uses, FLOPs 2 R rank (K + N): memory-bound.
Inference only: no autograd formula is registered; inputs that require grad are refused.
Autocast: registered to run in fp32 (torch.library.register_autocast), the adapters' dtype.

Backends: "ref" (plain PyTorch), "cpu" (csrc/lora_gather.h), "triton"
(pyengine.kernels.lora_gather).
"""
from __future__ import annotations

import torch
from torch import Tensor

from pyengine import _ext
from pyengine.backends import register_op, resolve

OP = "lora_gather"
register_op(OP, ("ref", "cpu", "triton"))
X_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# --------------------------------------------------------------------------- reference
def reference_lora_gather(x: Tensor, lora_a: Tensor, lora_b: Tensor, idx: Tensor) -> Tensor:
    """Gather every row's A and B, two bmm in fp32; rows with idx -1 get 0."""
    if not lora_a.shape[0]:  # an empty bank: every idx is -1
        return x.new_zeros(x.shape[0], lora_b.shape[1], dtype=torch.float32)
    keep = idx >= 0
    i = idx.clamp(min=0)
    t = torch.bmm(lora_a[i], x.float()[:, :, None])
    delta = torch.bmm(lora_b[i], t)[:, :, 0]
    return torch.where(keep[:, None], delta, delta.new_zeros(()))


# --------------------------------------------------------------------------- kernels
def _cpu(x, lora_a, lora_b, idx):
    n_adapters, rank, k = lora_a.shape
    y = x.new_zeros(x.shape[0], lora_b.shape[1])
    _ext._C.lora_gather_add(x.data_ptr(), x.shape[0], k, idx.data_ptr(), lora_a.data_ptr(),
                            lora_b.data_ptr(), n_adapters, rank, y.shape[1], y.data_ptr(),
                            _ext.num_threads())
    return y


def _triton(x, lora_a, lora_b, idx):
    from pyengine.kernels.lora_gather import lora_gather_add
    return lora_gather_add(x.new_zeros(x.shape[0], lora_b.shape[1]), x, idx, lora_a, lora_b)


KERNELS = {"ref": reference_lora_gather, "cpu": _cpu, "triton": _triton}


# --------------------------------------------------------------------------- custom op
@torch.library.custom_op("pyengine::lora_gather", mutates_args=())
def _lora_gather(x: Tensor, lora_a: Tensor, lora_b: Tensor, idx: Tensor, backend: str) -> Tensor:
    # the pointer kernels read fp32 / int64 bytes: refuse anything else (direct calls)
    torch._check(x.dtype == lora_a.dtype == lora_b.dtype == torch.float32
                 and idx.dtype == torch.int64,
                 lambda: f"pyengine::lora_gather takes fp32 x, lora_a, lora_b and int64 idx, "
                         f"got {x.dtype}, {lora_a.dtype}, {lora_b.dtype}, {idx.dtype}")
    return KERNELS[backend](x, lora_a, lora_b, idx)


@_lora_gather.register_fake
def _(x, lora_a, lora_b, idx, backend):
    return x.new_empty(x.shape[0], lora_b.shape[1])


for _device in ("cpu", "cuda"):
    torch.library.register_autocast(_lora_gather, _device, torch.float32)


# --------------------------------------------------------------------------- public API
def _check(x: Tensor, lora_a: Tensor, lora_b: Tensor, idx: Tensor) -> None:
    def shapes():
        return f"x {tuple(x.shape)}, lora_a {tuple(lora_a.shape)}, lora_b {tuple(lora_b.shape)}"
    if x.dim() != 2 or lora_a.dim() != 3 or lora_b.dim() != 3 or idx.dim() != 1:
        raise ValueError(f"lora_gather: {shapes()}, idx {tuple(idx.shape)} must be [R, K], "
                         f"[n_adapters, rank, K], [n_adapters, N, rank] and [R]")
    (R, K), (n_adapters, rank, _) = x.shape, lora_a.shape
    if lora_a.shape[2] != K or lora_b.shape[0] != n_adapters or lora_b.shape[2] != rank:
        raise ValueError(f"lora_gather: {shapes()}: need lora_a [n_adapters, rank, {K}] and "
                         f"lora_b [{n_adapters}, N, {rank}]")
    if idx.shape[0] != R:
        raise ValueError(f"lora_gather: idx {tuple(idx.shape)} must have one entry per row of "
                         f"x ({R})")
    if x.dtype not in X_DTYPES or lora_a.dtype != torch.float32 or lora_b.dtype != torch.float32:
        raise ValueError(f"lora_gather: dtypes x {x.dtype}, lora_a {lora_a.dtype}, lora_b "
                         f"{lora_b.dtype}; allowed: x in {X_DTYPES}, lora_a and lora_b fp32")
    if idx.dtype != torch.int64:
        raise ValueError(f"lora_gather: idx dtype {idx.dtype}; allowed: torch.int64")
    if len({t.device for t in (x, lora_a, lora_b, idx)}) != 1:
        raise ValueError(f"lora_gather: x, lora_a, lora_b, idx must be on one device, got "
                         f"{x.device}, {lora_a.device}, {lora_b.device}, {idx.device}")
    if idx.numel() and not -1 <= int(idx.min()) <= int(idx.max()) < n_adapters:
        r = int(((idx < -1) | (idx >= n_adapters)).nonzero()[0, 0])
        raise ValueError(f"lora_gather: idx[{r}] = {int(idx[r])} is outside [-1, {n_adapters}) "
                         f"(-1: no adapter; the bank holds {n_adapters})")
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x, lora_a, lora_b)):
        raise ValueError("lora_gather is inference only (no backward); run it under "
                         "torch.no_grad() / torch.inference_mode() or detach the inputs")


def lora_gather(x: Tensor, lora_a: Tensor, lora_b: Tensor, idx: Tensor, *,
                backend: str | None = None) -> Tensor:
    """fp32 [R, N]: row r is lora_b[idx[r]] @ (lora_a[idx[r]] @ x[r]), 0 where idx[r] == -1."""
    _check(x, lora_a, lora_b, idx)
    chosen = resolve(OP, backend, x.device)
    x, lora_a, lora_b, idx = (t.contiguous() for t in (x.float(), lora_a, lora_b, idx))
    return _lora_gather(x, lora_a, lora_b, idx, chosen)
