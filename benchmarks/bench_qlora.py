"""QLoRA cost: lora_linear fwd+bwd on a quantized base (nf4 / q4_0 / q8_0) against the same
op on a bf16 base (and the fused lora_mlp likewise), timed round-robin in one process
(medians; and at one thread in CPU time, steadier on a loaded machine).  No gate: this
records what a quantized base costs per step; the base's bytes shrink 2-4x.  Second test: the C++ dequantize to bf16 (done
once in the forward and once in the backward at training sizes) against its floor,
writing the same bf16 bytes (fill_), both on one thread, best of 15 (torch's
multi-threaded fill_ and any median are no floor on a loaded machine).

Run (short; the machine is shared):
    PYTHONPATH=. python -m pytest -q benchmarks/bench_qlora.py --benchmark-columns=median,rounds
"""
from __future__ import annotations

import time

import torch

from benchmarks.common import interleaved_medians, interleaved_times
from pyengine.ops import lora_linear, lora_mlp
from pyengine.ops.quant import dequantize_cpu
from pyengine.quant import quantize

TOKENS, D_IN, D_OUT, R = 256, 2048, 2048, 16


def test_qlora_linear_fwd_bwd(benchmark):
    torch.manual_seed(0)
    x0 = torch.randn(TOKENS, D_IN).bfloat16()
    w = (torch.randn(D_OUT, D_IN) / D_IN ** 0.5).bfloat16()
    a = (torch.randn(R, D_IN) / D_IN ** 0.5).requires_grad_()
    b = torch.randn(D_OUT, R).requires_grad_()
    bases = {"bf16": w, **{f: quantize(w, f) for f in ("nf4", "q4_0", "q8_0")}}

    def step(base):
        def run():
            x = x0.clone().requires_grad_()
            lora_linear(x, base, a, b, 2.0).float().sum().backward()
        return run

    fns = {k: step(v) for k, v in bases.items()}
    med = interleaved_medians(fns, repeats=5)
    # the same at one thread in CPU time of this thread: far steadier on a loaded machine
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cpu1 = interleaved_medians(fns, repeats=15, clock=time.thread_time)
    finally:
        torch.set_num_threads(threads)
    for k, base in bases.items():
        nbytes = base.numel() * 2 if k == "bf16" else base.nbytes
        benchmark.extra_info[f"{k}_ms"] = round(med[k] * 1e3, 2)
        benchmark.extra_info[f"{k}_base_MiB"] = round(nbytes / 2 ** 20, 2)
        benchmark.extra_info[f"{k}_vs_bf16"] = round(med[k] / med["bf16"], 2)
        benchmark.extra_info[f"{k}_cpu1_vs_bf16"] = round(cpu1[k] / cpu1["bf16"], 2)
    print({k: f"{v * 1e3:.1f} ms ({v / med['bf16']:.2f}x)" for k, v in med.items()})
    print("1 thread, CPU time:",
          {k: f"{v * 1e3:.1f} ms ({v / cpu1['bf16']:.2f}x)" for k, v in cpu1.items()})
    benchmark.pedantic(fns["nf4"], rounds=2, warmup_rounds=0)


def test_qlora_mlp_fwd_bwd(benchmark):
    """The fused lora_mlp (SmolLM widths) on quantized bases vs bf16 bases: each projection
    dequantized in C++ before its GEMM, forward and backward (one CPU-time ratio per format,
    one thread, medians of 9)."""
    torch.manual_seed(0)
    hidden, inter = 576, 1536
    x0 = torch.randn(TOKENS, hidden).bfloat16()
    shapes = [(inter, hidden), (inter, hidden), (hidden, inter)]
    dense = [(torch.randn(*s) / s[1] ** 0.5).bfloat16() for s in shapes]
    adapters = [t.requires_grad_() for s in shapes
                for t in (torch.randn(R, s[1]) / s[1] ** 0.5, torch.randn(s[0], R))]
    bases = {"bf16": dense, **{f: [quantize(w, f) for w in dense] for f in ("nf4", "q4_0", "q8_0")}}

    def step(ws):
        def run():
            x = x0.clone().requires_grad_()
            a = adapters
            lora_mlp(x, ws[0], a[0], a[1], ws[1], a[2], a[3], ws[2], a[4], a[5],
                     2.0).float().sum().backward()
        return run

    fns = {k: step(v) for k, v in bases.items()}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cpu1 = interleaved_medians(fns, repeats=9, clock=time.thread_time)
    finally:
        torch.set_num_threads(threads)
    for k in bases:
        benchmark.extra_info[f"{k}_cpu1_ms"] = round(cpu1[k] * 1e3, 2)
        benchmark.extra_info[f"{k}_cpu1_vs_bf16"] = round(cpu1[k] / cpu1["bf16"], 2)
    print("lora_mlp, 1 thread, CPU time:",
          {k: f"{v * 1e3:.1f} ms ({v / cpu1['bf16']:.2f}x)" for k, v in cpu1.items()})
    benchmark.pedantic(fns["nf4"], rounds=2, warmup_rounds=0)


def test_dequantize_vs_floor(benchmark):
    torch.manual_seed(0)
    w = (torch.randn(D_OUT, D_IN) / D_IN ** 0.5).bfloat16()
    out = torch.empty(D_OUT, D_IN, dtype=torch.bfloat16)
    fns = {"write floor (fill_ bf16)": lambda: out.fill_(1.0)}
    for f in ("nf4", "q4_0", "q8_0"):
        q = quantize(w, f)
        fns[f] = (lambda q=q, f=f: dequantize_cpu(q.qs, q.scales, f, D_IN, torch.bfloat16))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        med = {k: min(v) for k, v in interleaved_times(fns, repeats=15).items()}
    finally:
        torch.set_num_threads(threads)
    floor = med["write floor (fill_ bf16)"]
    for k, v in med.items():
        benchmark.extra_info[f"{k}_ms"] = round(v * 1e3, 3)
        benchmark.extra_info[f"{k}_vs_floor"] = round(v / floor, 2)
    print({k: f"{v * 1e3:.2f} ms ({v / floor:.2f}x floor)" for k, v in med.items()})
    benchmark.pedantic(fns["nf4"], rounds=2, warmup_rounds=0)
