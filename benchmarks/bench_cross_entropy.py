"""Fused linear + cross-entropy, fwd+bwd (grads for hidden and weight), at LM-head shapes.

Side by side in one process: ours (cpu backend) vs torch eager (F.linear then
F.cross_entropy on fp32 logits), torch.compile of the same, and torch 2.13's
F.linear_cross_entropy(..., options=LinearCrossEntropyOptions()).  Reported: median time,
ratios, time as a multiple of the 3-GEMM floor (the three GEMMs timed alone at the same
shapes, same run), and peak extra memory (fresh subprocess, VmHWM, outputs subtracted).

    make bench                                      # pytest-benchmark gates
    python -m benchmarks.bench_cross_entropy        # the full table -> RESULTS.md section
"""
from __future__ import annotations

import gc
import os
import sys

import pytest
import torch
import torch.nn.functional as F

from benchmarks.common import (interleaved_medians, peak_extra_in_subprocess, reset_peak,
                               vm_rss_bytes)
from pyengine.ops import fused_linear_cross_entropy

SHAPES = [(2048, 576, 49152), (2048, 2048, 32000), (1024, 896, 151936)]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# targets from the issue, as ratios measured in the same run
MAX_VS_EAGER, MAX_VS_COMPILE, MAX_VS_FLOOR, MAX_MEM_VS_EAGER = 0.6, 0.95, 1.25, 0.10


def eager_loss(h, w, t):
    return F.cross_entropy(F.linear(h, w).float(), t)


def torch_lce_loss(h, w, t):
    return F.linear_cross_entropy(h, w, t, options=torch.nn.LinearCrossEntropyOptions())


def ours_loss(h, w, t):
    return fused_linear_cross_entropy(h, w, t, backend="cpu")


_compiled = torch.compile(eager_loss)
IMPLS = {"ours": ours_loss, "eager": eager_loss, "compile": _compiled, "torch_lce": torch_lce_loss}


def make_inputs(n, h, v, dtype):
    g = torch.Generator().manual_seed(n + h + v)
    hidden = torch.randn(n, h, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(v, h, generator=g) / h**0.5).to(dtype).requires_grad_()
    target = torch.randint(0, v, (n,), generator=g)
    return hidden, weight, target


def fwd_bwd(loss_fn, hidden, weight, target):
    hidden.grad = weight.grad = None
    loss_fn(hidden, weight, target).backward()


def three_gemms(hidden, weight, grad_logits):
    h, w = hidden.detach(), weight.detach()
    torch.mm(h, w.t())
    torch.mm(grad_logits, w)
    torch.mm(grad_logits.t(), h)


def measure_times(n, h, v, dtype, repeats=3):
    hidden, weight, target = make_inputs(n, h, v, dtype)
    fns = {name: (lambda fn=fn: fwd_bwd(fn, hidden, weight, target)) for name, fn in IMPLS.items()}
    grad_logits = torch.randn(n, v).to(dtype)
    fns["3-GEMM floor"] = lambda: three_gemms(hidden, weight, grad_logits)
    times = interleaved_medians(fns, repeats=repeats)
    del grad_logits
    gc.collect()
    return times


def memory_probe(impl, n, h, v, dtype):
    """Subprocess side of peak_extra_in_subprocess: warm up, reset the peak, run once."""
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", torch.get_num_threads())))
    hidden, weight, target = make_inputs(n, h, v, getattr(torch, dtype))
    fwd_bwd(IMPLS[impl], hidden, weight, target)  # warm-up (compiles for "compile")
    hidden.grad = weight.grad = None
    gc.collect()
    reset_peak()
    base = vm_rss_bytes()
    fwd_bwd(IMPLS[impl], hidden, weight, target)
    outputs = hidden.grad.nbytes + weight.grad.nbytes
    return base + outputs  # peak growth beyond the outputs = extra memory


def peak_extra_mb(impl, n, h, v, dtype_name):
    extra = peak_extra_in_subprocess("benchmarks.bench_cross_entropy", "memory_probe", impl=impl,
                                     n=n, h=h, v=v, dtype=str(DTYPES[dtype_name]).split(".")[1])
    return max(extra, 0) / 2**20


# ------------------------------------------------------------------ pytest-benchmark gates
@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "N{}xH{}xV{}".format(*s))
def test_fused_linear_cross_entropy_speed(benchmark, shape, dtype_name):
    times = measure_times(*shape, DTYPES[dtype_name])
    hidden, weight, target = make_inputs(*shape, DTYPES[dtype_name])
    benchmark.pedantic(fwd_bwd, args=(ours_loss, hidden, weight, target), rounds=1, iterations=1)
    ratios = {f"vs_{k}": times["ours"] / t for k, t in times.items() if k != "ours"}
    benchmark.extra_info.update(ratios)
    assert ratios["vs_eager"] <= MAX_VS_EAGER, ratios
    assert ratios["vs_compile"] <= MAX_VS_COMPILE, ratios
    assert ratios["vs_3-GEMM floor"] <= MAX_VS_FLOOR, ratios


@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_fused_linear_cross_entropy_memory(dtype_name):
    shape = SHAPES[0]
    ours, eager = (peak_extra_mb(i, *shape, dtype_name) for i in ("ours", "eager"))
    assert ours <= MAX_MEM_VS_EAGER * eager, (ours, eager)


# ------------------------------------------------------------------ the table
def table(shapes=SHAPES, dtypes=tuple(DTYPES), with_memory=True) -> str:
    rows = ["| shape (N, H, V) | dtype | ours s | eager s | compile s | F.linear_cross_entropy s "
            "| 3-GEMM floor s | ours/eager | ours/compile | ours/floor | extra MB ours / eager / "
            "compile / lce |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for shape in shapes:
        for dn in dtypes:
            t = measure_times(*shape, DTYPES[dn])
            mem = "-"
            if with_memory:
                mem = " / ".join(f"{peak_extra_mb(i, *shape, dn):.0f}" for i in IMPLS)
            rows.append(f"| {shape} | {dn} | {t['ours']:.3f} | {t['eager']:.3f} | "
                        f"{t['compile']:.3f} | {t['torch_lce']:.3f} | {t['3-GEMM floor']:.3f} | "
                        f"{t['ours'] / t['eager']:.2f} | {t['ours'] / t['compile']:.2f} | "
                        f"{t['ours'] / t['3-GEMM floor']:.2f} | {mem} |")
            print(rows[-1], file=sys.stderr, flush=True)
    return "\n".join(rows)


if __name__ == "__main__":
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(table())
