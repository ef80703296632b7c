"""Fused linear + cross-entropy, fwd+bwd (grads for hidden and weight), at LM-head shapes.

Side by side in one process: ours (cpu backend; exact, and with filter_eps="auto" gradient
filtering) vs torch eager (F.linear then F.cross_entropy on fp32 logits), torch.compile of
the same, and torch 2.13's F.linear_cross_entropy(..., options=LinearCrossEntropyOptions()).
Inputs: "random" (randn hidden and weight: logits ~N(0, 1), a flat softmax, the worst case
for filtering) and "lm" (a trained LM's shape of softmax: a Zipf prior over a shuffled
vocab plus a pull towards the target; loss ~2.8 nats, ~7% of the entries above bf16's
filter eps per 256-token block).  Filtering only pays where the softmax is peaked, so its
gate runs on "lm" inputs.  Reported: median time,
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
MAX_FILTERED_VS_COMPILE = 0.7  # bf16, filter_eps="auto", "lm" inputs
GPT2_HEAD = (2048, 768, 50257)  # the memory shape
FILTER_SHAPES = [(2048, 576, 49152), (2048, 2048, 32000), (1024, 896, 151936)]


def eager_loss(h, w, t):
    return F.cross_entropy(F.linear(h, w).float(), t)


def torch_lce_loss(h, w, t):
    return F.linear_cross_entropy(h, w, t, options=torch.nn.LinearCrossEntropyOptions())


def ours_loss(h, w, t):
    return fused_linear_cross_entropy(h, w, t, backend="cpu")


def ours_filtered_loss(h, w, t):
    return fused_linear_cross_entropy(h, w, t, backend="cpu", filter_eps="auto")


_compiled = torch.compile(eager_loss)
IMPLS = {"ours": ours_loss, "ours_auto": ours_filtered_loss, "eager": eager_loss,
         "compile": _compiled, "torch_lce": torch_lce_loss}
EXACT_PEERS = ("ours", "eager", "compile", "torch_lce")  # the exact-mode table and gates


def make_inputs(n, h, v, dtype, kind="random"):
    g = torch.Generator().manual_seed(n + h + v)
    if kind == "lm":
        return lm_inputs(n, h, v, dtype, g)
    hidden = torch.randn(n, h, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(v, h, generator=g) / h**0.5).to(dtype).requires_grad_()
    target = torch.randint(0, v, (n,), generator=g)
    return hidden, weight, target


def lm_inputs(n, h, v, dtype, g):
    """Logits shaped like a trained LM's: z_ij = log f_j (Zipf over a shuffled vocab, carried
    by feature 0) + noise ~N(0, 1) + 6 |W_t|^2 pull towards the target; targets drawn from f."""
    rank = torch.randperm(v, generator=g).double() + 1
    weight = torch.randn(v, h, generator=g, dtype=torch.float64) / h**0.5
    weight[:, 0] = -rank.log()
    target = torch.multinomial(1 / rank, n, replacement=True, generator=g)
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64) + 6.0 * weight[target]
    hidden[:, 0] = 1.0
    return hidden.to(dtype).requires_grad_(), weight.to(dtype).requires_grad_(), target


def fwd_bwd(loss_fn, hidden, weight, target):
    hidden.grad = weight.grad = None
    loss_fn(hidden, weight, target).backward()


def three_gemms(hidden, weight, grad_logits):
    h, w = hidden.detach(), weight.detach()
    torch.mm(h, w.t())
    torch.mm(grad_logits, w)
    torch.mm(grad_logits.t(), h)


def measure_times(n, h, v, dtype, repeats=3, kind="random", impls=EXACT_PEERS):
    hidden, weight, target = make_inputs(n, h, v, dtype, kind)
    fns = {name: (lambda fn=IMPLS[name]: fwd_bwd(fn, hidden, weight, target)) for name in impls}
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


@pytest.mark.parametrize("shape", FILTER_SHAPES, ids=lambda s: "N{}xH{}xV{}".format(*s))
def test_filtered_speed(benchmark, shape):
    """bf16, filter_eps="auto", "lm" inputs: <= 0.7x torch.compile's fwd+bwd time."""
    times = measure_times(*shape, torch.bfloat16, kind="lm",
                          impls=("ours", "ours_auto", "compile"))
    hidden, weight, target = make_inputs(*shape, torch.bfloat16, "lm")
    benchmark.pedantic(fwd_bwd, args=(ours_filtered_loss, hidden, weight, target), rounds=1,
                       iterations=1)
    ratio = times["ours_auto"] / times["compile"]
    benchmark.extra_info.update(vs_compile=ratio, vs_ours_exact=times["ours_auto"] / times["ours"])
    assert ratio <= MAX_FILTERED_VS_COMPILE, times


@pytest.mark.parametrize("dtype_name, shape", [(d, SHAPES[0]) for d in DTYPES]
                         + [("fp32", GPT2_HEAD)], ids=str)
def test_fused_linear_cross_entropy_memory(dtype_name, shape):
    """Extra memory <= 10% of eager's: a second V x H buffer (grad_W temp) would fail it."""
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
                mem = " / ".join(f"{peak_extra_mb(i, *shape, dn):.0f}" for i in EXACT_PEERS)
            rows.append(f"| {shape} | {dn} | {t['ours']:.3f} | {t['eager']:.3f} | "
                        f"{t['compile']:.3f} | {t['torch_lce']:.3f} | {t['3-GEMM floor']:.3f} | "
                        f"{t['ours'] / t['eager']:.2f} | {t['ours'] / t['compile']:.2f} | "
                        f"{t['ours'] / t['3-GEMM floor']:.2f} | {mem} |")
            print(rows[-1], file=sys.stderr, flush=True)
    return "\n".join(rows)


def filter_table(shapes=FILTER_SHAPES, kinds=("lm", "random")) -> str:
    """bf16 fwd+bwd: ours exact, ours with filter_eps="auto", torch.compile."""
    rows = ["| shape (N, H, V) | inputs | ours exact s | ours auto s | compile s | auto/compile "
            "| auto/exact |", "|---|---|---|---|---|---|---|"]
    for shape in shapes:
        for kind in kinds:
            t = measure_times(*shape, torch.bfloat16, kind=kind,
                              impls=("ours", "ours_auto", "compile"))
            rows.append(f"| {shape} | {kind} | {t['ours']:.3f} | {t['ours_auto']:.3f} | "
                        f"{t['compile']:.3f} | {t['ours_auto'] / t['compile']:.2f} | "
                        f"{t['ours_auto'] / t['ours']:.2f} |")
            print(rows[-1], file=sys.stderr, flush=True)
    return "\n".join(rows)


if __name__ == "__main__":
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    if "--filter" in sys.argv:
        print(filter_table())
    else:
        print(table())
