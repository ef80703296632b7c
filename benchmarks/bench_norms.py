"""rms_norm / layer_norm (+ residual) and rope vs their torch eager and torch.compile
compositions, forward and forward+backward, bf16, side by side in one process.

Shapes (Llama-like): tokens 1024 and 2048 x hidden 576 and 2048 for the norms; q/k of
batch 4 x 9/3 heads x seq 512 x head dim 64 for rope.  Floor: bytes read + written by the
op (the table's `floor` column) at BANDWIDTH; ratios are time / floor.
    norms fwd: x, residual in; y, s out (4 rows of H per token); bwd: s, dy, ds in, dx out
    rope  fwd: q, k, cos, sin in; q, k out;  bwd: dq, dk, cos, sin in, dq, dk out

    PYTHONPATH=. python benchmarks/bench_norms.py [--no-compile]   # markdown table
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from benchmarks.common import interleaved_medians
from pyengine.ops import layer_norm, rms_norm, rope

BANDWIDTH = 35e9  # bytes/s, the machine's measured stream bandwidth
NORM_SHAPES = [(1024, 576), (2048, 576), (1024, 2048), (2048, 2048)]
ROPE_SHAPE = (4, 9, 3, 512, 64)
REPEATS, WARMUP = 7, 2


def eager_rms(x, res, w):
    s = x + res
    h = s.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
    return w * h.to(s.dtype), s


def eager_ln(x, res, w, b):
    s = x + res
    return F.layer_norm(s, s.shape[-1:], w, b, 1e-5), s


def eager_rope(q, k, cos, sin):
    def rot(x):
        x1, x2 = x.chunk(2, -1)
        return torch.cat((-x2, x1), -1)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + rot(q) * sin, k * cos + rot(k) * sin


def ours_rms(x, res, w):
    return rms_norm(x, w, 1e-6, res)


def ours_ln(x, res, w, b):
    return layer_norm(x, w, b, 1e-5, res)


def ours_rope(q, k, cos, sin):
    return rope(q, k, cos, sin)


def step(fn, inputs, grads, backward):
    """One call of fn (and its backward when asked) on fresh-grad leaves."""
    for t in inputs:
        t.grad = None
    with torch.set_grad_enabled(backward):
        outs = fn(*inputs)
        if backward:
            torch.autograd.backward(outs, grads)


def norm_case(kind, tokens, hidden):
    gen = torch.Generator().manual_seed(0)
    bf = torch.bfloat16
    x, res = (torch.randn(tokens, hidden, generator=gen).to(bf) for _ in range(2))
    w, b = (torch.randn(hidden, generator=gen).to(bf) for _ in range(2))
    params = [x, res, w] + ([b] if kind == "layer_norm" else [])
    inputs = [t.requires_grad_() for t in params]
    grads = [torch.randn(tokens, hidden, generator=gen).to(bf) for _ in range(2)]
    row = tokens * hidden * 2
    floors = {"fwd": 4 * row, "fwd+bwd": 4 * row + 4 * row}
    fns = {"layer_norm": (ours_ln, eager_ln), "rms_norm": (ours_rms, eager_rms)}[kind]
    return f"{kind}+res {tokens}x{hidden}", fns, inputs, grads, floors


def rope_case():
    B, Hq, Hk, S, D = ROPE_SHAPE
    gen = torch.Generator().manual_seed(0)
    bf = torch.bfloat16
    q = torch.randn(B, S, Hq, D, generator=gen).to(bf).transpose(1, 2).requires_grad_()
    k = torch.randn(B, S, Hk, D, generator=gen).to(bf).transpose(1, 2).requires_grad_()
    cos, sin = (torch.randn(B, S, D, generator=gen).to(bf) for _ in range(2))
    grads = [torch.randn(B, Hq, S, D, generator=gen).to(bf),
             torch.randn(B, Hk, S, D, generator=gen).to(bf)]
    qk = (q.numel() + k.numel()) * 2
    trig = 2 * cos.numel() * 2
    floors = {"fwd": 2 * qk + trig, "fwd+bwd": 2 * (2 * qk + trig)}
    return f"rope q/k {B}x{Hq}/{Hk}x{S}x{D}", (ours_rope, eager_rope), [q, k, cos, sin], grads, \
        floors


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile column")
    args = ap.parse_args()
    cases = [norm_case(kind, t, h) for kind in ("rms_norm", "layer_norm")
             for t, h in NORM_SHAPES] + [rope_case()]
    print(f"threads {torch.get_num_threads()}, bf16, medians of {REPEATS}; floor = bytes / "
          f"{BANDWIDTH / 1e9:.0f} GB/s\n")
    print("| op | pass | ours ms | eager ms | compile ms | ours/eager | ours/compile | "
          "floor ms | ours/floor |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, (ours, eager), inputs, grads, floors in cases:
        for mode in ("fwd", "fwd+bwd"):
            bwd = mode == "fwd+bwd"
            fns = {"ours": lambda: step(ours, inputs, grads, bwd),
                   "eager": lambda: step(eager, inputs, grads, bwd)}
            if not args.no_compile:
                compiled = torch.compile(eager, dynamic=False)
                fns["compile"] = lambda: step(compiled, inputs, grads, bwd)
            t = interleaved_medians(fns, REPEATS, WARMUP)
            floor = floors[mode] / BANDWIDTH
            comp = t.get("compile")
            cols = [f"{t['ours'] * 1e3:.3f}", f"{t['eager'] * 1e3:.3f}",
                    "-" if comp is None else f"{comp * 1e3:.3f}", f"{t['ours'] / t['eager']:.2f}",
                    "-" if comp is None else f"{t['ours'] / comp:.2f}", f"{floor * 1e3:.3f}",
                    f"{t['ours'] / floor:.2f}"]
            print(f"| {name} | {mode} | " + " | ".join(cols) + " |")


if __name__ == "__main__":
    main()
