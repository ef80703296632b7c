"""Quantized matmul: GEMV (decode, 1 token) and GEMM (prefill, 128 tokens), cpu backend.

Side by side in one process (interleaved medians): ours (q8_0 / q4_0 / nf4) vs torch fp32
and bf16 F.linear, and torch's own CPU weight-only paths (int8: aten._weight_int8pack_mm,
per-channel scales, bf16 x; int4: aten._weight_int4pack_mm_for_cpu, group 32, bf16 x).
The machine's copy bandwidth is measured in the same run (copy of 256 MB into a
preallocated tensor, read + write bytes counted) and GEMV is reported as effective
bandwidth = weight bytes / time.  GEMV weights are rotated over copies totalling >= 2x
the L3 so every call reads from memory.  Wall-clock medians use all threads; because the
machine is shared, the table also gives single-thread CPU-time (thread_time) medians,
which descheduling by other processes does not inflate.

Gates (ratios, same run): GEMV bandwidth >= 0.8 x copy bandwidth; GEMM (128 tokens)
time <= torch bf16 F.linear.

    PYTHONPATH=. python -m pytest -q benchmarks/bench_quant.py    # gates
    PYTHONPATH=. python -m benchmarks.bench_quant                 # table -> RESULTS_quant.md
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from benchmarks.common import interleaved_medians
from pyengine.ops import quant_matmul
from pyengine.quant import QuantizedWeight, quantize

SHAPES = [(4096, 4096), (11008, 4096)]  # (N out, K in)
FMTS = ("q8_0", "q4_0", "nf4")
PREFILL_TOKENS = 128
ROTATE_BYTES = 64 << 20  # >= 2x the 32 MB L3
MIN_GEMV_BW_FRACTION = 0.8
MAX_GEMM_VS_BF16 = 1.0


def copy_bandwidth(mb: int = 256, repeats: int = 9, cpu_time: bool = False) -> float:
    """GB/s of copying `mb` MB into a preallocated tensor, read + write bytes counted."""
    src = torch.randn(mb * 2**20 // 4)
    dst = torch.empty_like(src)
    fns = {"copy": lambda: dst.copy_(src)}
    medians = thread_time_medians if cpu_time else interleaved_medians
    t = medians(fns, repeats=repeats)["copy"]
    return 2 * src.nbytes / t / 1e9


def thread_time_medians(fns, repeats, warmup=1):
    """Single-thread CPU-time medians, round-robin (robust to other processes' load)."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return interleaved_medians(fns, repeats, warmup, clock=time.thread_time)
    finally:
        torch.set_num_threads(prev)


class Rotating:
    """Call fn(copy) on copies of some weight in turn, so no call finds it in cache."""

    def __init__(self, make, nbytes: int):
        self.copies = [make(i) for i in range(max(1, -(-ROTATE_BYTES // nbytes)))]
        self.i = 0

    def __call__(self, fn):
        self.i = (self.i + 1) % len(self.copies)
        return fn(self.copies[self.i])


def _clone_q(q: QuantizedWeight) -> QuantizedWeight:
    return QuantizedWeight(q.fmt, q.shape, q.qs.clone(), q.scales.clone())


def torch_int8_weight(w):
    scale = w.abs().amax(1) / 127
    return (w / scale[:, None]).round().to(torch.int8), scale.bfloat16()


def torch_int4_weight(w, group=32):
    """aten int4 CPU path: uint4 codes (asymmetric, zero 8) + [K/group, N, 2] scale/zero."""
    n, k = w.shape
    g = w.reshape(n, k // group, group)
    scale = g.abs().amax(-1) / 7
    q = (g / scale[..., None]).round().clamp(-8, 7).add(8).to(torch.int32).reshape(n, k)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    sz = torch.stack([scale.t(), torch.zeros_like(scale.t())], -1).bfloat16().contiguous()
    return packed, sz


def gemv_times(n, k, repeats=25, cpu_time=False):
    """Median seconds per 1-token matmul and the weight bytes each reads."""
    g = torch.Generator().manual_seed(n + k)
    w = torch.randn(n, k, generator=g) / k**0.5
    x = torch.randn(1, k, generator=g)
    xb = x.bfloat16()
    fns, nbytes = {}, {}
    for fmt in FMTS:
        q = quantize(w, fmt)
        rot = Rotating(lambda i, q=q: _clone_q(q), q.nbytes)
        fns[fmt] = lambda rot=rot: rot(lambda c: quant_matmul(x, c, backend="cpu"))
        nbytes[fmt] = q.nbytes
    for name, dtype in (("torch fp32", torch.float32), ("torch bf16", torch.bfloat16)):
        wd = w.to(dtype)
        rot = Rotating(lambda i, wd=wd: wd.clone(), wd.nbytes)
        xd = x.to(dtype)
        fns[name] = lambda rot=rot, xd=xd: rot(lambda c: F.linear(xd, c))
        nbytes[name] = wd.nbytes
    w8, s8 = torch_int8_weight(w)
    rot8 = Rotating(lambda i: w8.clone(), w8.nbytes + s8.nbytes)
    fns["torch int8"] = lambda: rot8(lambda c: torch.ops.aten._weight_int8pack_mm(xb, c, s8))
    nbytes["torch int8"] = w8.nbytes + s8.nbytes
    w4, sz4 = torch_int4_weight(w)
    rot4 = Rotating(lambda i: w4.clone(), w4.nbytes + sz4.nbytes)
    fns["torch int4"] = lambda: rot4(
        lambda c: torch.ops.aten._weight_int4pack_mm_for_cpu(xb, c, 32, sz4))
    nbytes["torch int4"] = w4.nbytes + sz4.nbytes
    if cpu_time:
        return thread_time_medians(fns, repeats=repeats), nbytes
    return interleaved_medians(fns, repeats=repeats, warmup=2), nbytes


def gemm_times(n, k, m=PREFILL_TOKENS, repeats=5, cpu_time=False):
    g = torch.Generator().manual_seed(n * k + m)
    w = torch.randn(n, k, generator=g) / k**0.5
    x = torch.randn(m, k, generator=g)
    xb, wb = x.bfloat16(), w.bfloat16()
    fns = {fmt: (lambda q=quantize(w, fmt): quant_matmul(x, q, backend="cpu")) for fmt in FMTS}
    fns.update({f"{fmt} bf16-x": (lambda q=quantize(w, fmt): quant_matmul(xb, q, backend="cpu"))
                for fmt in ("q4_0",)})
    fns["torch bf16"] = lambda: F.linear(xb, wb)
    fns["torch fp32"] = lambda: F.linear(x, w)
    if cpu_time:
        return thread_time_medians(fns, repeats=repeats)
    return interleaved_medians(fns, repeats=repeats, warmup=1)


# ------------------------------------------------------------------ pytest gates
_cache: dict = {}


def _measured(kind, n, k):
    key = (kind, n, k)
    if key not in _cache:
        if "copy" not in _cache:
            _cache["copy"] = copy_bandwidth()
        _cache[key] = gemv_times(n, k) if kind == "gemv" else gemm_times(n, k)
    return _cache[key]


@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "{}x{}".format(*s))
def test_gemv_bandwidth(benchmark, shape, fmt):
    times, nbytes = _measured("gemv", *shape)
    q = quantize(torch.randn(*shape), fmt)
    x = torch.randn(1, shape[1])
    benchmark.pedantic(quant_matmul, args=(x, q), kwargs={"backend": "cpu"}, rounds=3)
    bw = nbytes[fmt] / times[fmt] / 1e9
    ratio = bw / _cache["copy"]
    benchmark.extra_info.update(bw_gbs=bw, copy_gbs=_cache["copy"], bw_vs_copy=ratio,
                                vs_bf16=times["torch bf16"] / times[fmt])
    assert ratio >= MIN_GEMV_BW_FRACTION, (bw, _cache["copy"])


@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "{}x{}".format(*s))
def test_gemm_prefill(benchmark, shape, fmt):
    times = _measured("gemm", *shape)
    q = quantize(torch.randn(*shape), fmt)
    x = torch.randn(PREFILL_TOKENS, shape[1])
    benchmark.pedantic(quant_matmul, args=(x, q), kwargs={"backend": "cpu"}, rounds=1)
    ratio = times[fmt] / times["torch bf16"]
    benchmark.extra_info.update(vs_bf16=ratio)
    assert ratio <= MAX_GEMM_VS_BF16, times


# ------------------------------------------------------------------ the table
def gemv_table(copy, cpu_time):
    out = ["| N x K | impl | weight MB | median ms | GB/s | vs copy bw | speed-up vs fp32 | "
           "vs bf16 |", "|---|---|---|---|---|---|---|---|"]
    for n, k in SHAPES:
        times, nbytes = gemv_times(n, k, cpu_time=cpu_time)
        for name, t in times.items():
            bw = nbytes[name] / t / 1e9
            out.append(f"| {n}x{k} | {name} | {nbytes[name] / 2**20:.1f} | {t * 1e3:.3f} | "
                       f"{bw:.1f} | {bw / copy:.2f} | {times['torch fp32'] / t:.2f} | "
                       f"{times['torch bf16'] / t:.2f} |")
            print(out[-1], file=sys.stderr, flush=True)
    return out


def gemm_table(cpu_time):
    out = ["| N x K | impl | median ms | GMAC/s | time / torch bf16 |", "|---|---|---|---|---|"]
    for n, k in SHAPES:
        times = gemm_times(n, k, cpu_time=cpu_time)
        for name, t in times.items():
            out.append(f"| {n}x{k} | {name} | {t * 1e3:.2f} | "
                       f"{PREFILL_TOKENS * n * k / t / 1e9:.0f} | {t / times['torch bf16']:.2f} |")
            print(out[-1], file=sys.stderr, flush=True)
    return out


def table() -> str:
    copy = copy_bandwidth()
    threads = torch.get_num_threads()
    out = [f"copy bandwidth ({threads} threads, 256 MB, read+write): **{copy:.1f} GB/s**; "
           f"80% target: {0.8 * copy:.1f} GB/s", "",
           f"### GEMV, 1 token, wall clock, {threads} threads "
           "(fp32 x; torch int8/int4 take bf16 x)", ""]
    out += gemv_table(copy, cpu_time=False)
    copy1 = copy_bandwidth(cpu_time=True)
    out += ["", "### GEMV, 1 token, single-thread CPU time", "",
            f"copy bandwidth of one thread (CPU time): **{copy1:.1f} GB/s**", ""]
    out += gemv_table(copy1, cpu_time=True)
    out += ["", f"### GEMM, {PREFILL_TOKENS} tokens, wall clock, {threads} threads "
            "(fp32 x unless noted)", ""]
    out += gemm_table(cpu_time=False)
    out += ["", f"### GEMM, {PREFILL_TOKENS} tokens, single-thread CPU time", ""]
    out += gemm_table(cpu_time=True)
    return "\n".join(out)


if __name__ == "__main__":
    head = (f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average "
            f"{os.getloadavg()[0]:.1f} at start, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(head)
    body = table()
    print(body)
    Path(__file__).with_name("RESULTS_quant.md").write_text(
        "# Quantized matmul (benchmarks/bench_quant.py)\n\n"
        "Command: `PYTHONPATH=. python -m benchmarks.bench_quant`\n\n"
        f"{head}\n\n{body}\n")
