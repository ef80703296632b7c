"""pyengine.ops.attention vs torch's F.scaled_dot_product_attention (is_causal=True,
enable_gqa=True), forward and forward+backward, side by side in one process.

Shape: SmolLM-135M-like Llama attention, batch 4, 9 query heads, 3 kv heads, head_dim 64,
causal; seq 256 / 512 / 2048; bf16 and fp32.  Timed round-robin (benchmarks/common.py),
medians.  Floor: causal FLOPs (forward 2 B Hq S^2 D, backward 2.5x that) at this
machine's GEMM rate in the same dtype, measured here on a square torch.matmul.

    PYTHONPATH=. python benchmarks/bench_attention.py [--seqs 256 512 2048] [--repeats 5]
        [--dtypes bf16 fp32] [--cpu-time]   (thread CPU time: only for --threads 1)
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from benchmarks.common import interleaved_medians
from pyengine.ops import attention

B, HQ, HKV, D = 4, 9, 3, 64
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def gemm_rate(dtype, n=1024, repeats=5) -> float:
    """FLOP/s of an n x n x n torch.matmul in dtype (the floor's rate)."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    t = interleaved_medians({"mm": lambda: a @ b}, repeats=repeats, warmup=2)["mm"]
    return 2 * n ** 3 / t


def fwd_bwd(fn, q, k, v, dout):
    def call():
        q.grad = k.grad = v.grad = None
        fn(q, k, v).backward(dout)
    return call


def measure(dtype, S, repeats, clock):
    gen = torch.Generator().manual_seed(S)
    q, k, v = (torch.randn(B, h, S, D, generator=gen).to(dtype).requires_grad_()
               for h in (HQ, HKV, HKV))
    dout = torch.randn(B, HQ, S, D, generator=gen).to(dtype)
    peers = {"sdpa": lambda a, b, c: F.scaled_dot_product_attention(a, b, c, is_causal=True,
                                                                      enable_gqa=True),
             "ours": lambda a, b, c: attention(a, b, c)}
    with torch.no_grad():
        fwd = interleaved_medians({n: (lambda f=f: f(q, k, v)) for n, f in peers.items()},
                                  repeats, 1, clock)
    both = interleaved_medians({n: fwd_bwd(f, q, k, v, dout) for n, f in peers.items()},
                               repeats, 1, clock)
    return fwd, both


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seqs", type=int, nargs="+", default=[256, 512, 2048])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    ap.add_argument("--cpu-time", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    clock = time.thread_time if args.cpu_time else time.perf_counter
    print(f"threads {args.threads}, {'thread CPU time' if args.cpu_time else 'wall time'}, "
          f"medians of {args.repeats}")
    print("| dtype | seq | fwd sdpa ms | fwd ours ms | fwd speedup | fwd+bwd sdpa ms "
          "| fwd+bwd ours ms | fwd+bwd speedup | ours fwd+bwd / floor |")
    print("|---|---|---|---|---|---|---|---|---|")
    for dtype in (DTYPES[d] for d in args.dtypes):
        rate = gemm_rate(dtype)
        for S in args.seqs:
            fwd, both = measure(dtype, S, args.repeats, clock)
            floor = 3.5 * 2 * B * HQ * S * S * D / rate
            print(f"| {str(dtype)[6:]} | {S} | {fwd['sdpa'] * 1e3:.1f} | {fwd['ours'] * 1e3:.1f} "
                  f"| {fwd['sdpa'] / fwd['ours']:.2f}x | {both['sdpa'] * 1e3:.1f} "
                  f"| {both['ours'] * 1e3:.1f} | {both['sdpa'] / both['ours']:.2f}x "
                  f"| {both['ours'] / floor:.1f}x |", flush=True)
        print(f"(GEMM rate {dtype}: {rate / 1e9:.0f} GFLOP/s)")


if __name__ == "__main__":
    main()
