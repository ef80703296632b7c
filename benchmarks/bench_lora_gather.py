"""Batched gather-LoRA (pyengine.ops.lora_gather) at serving shapes: a decode batch of R rows
over a few adapters, cpu backend vs plain torch (gather every row's A and B, two bmm:
reference_lora_gather), side by side in one process (interleaved rounds, medians).

    ours C++    _C.lora_gather_add into a preallocated y (what the decode step calls)
    ours op     the public op lora_gather(..., backend="cpu") (checks + y allocation)
    torch       reference_lora_gather (torch gather + bmm)

Each call uses the next of several bank copies (--bank-mb in all), so the adapters come
from memory as in a many-layer model, not from cache.  The floor (bytes: each used
adapter's A and B once + x + y read and written) over the C++ time is printed as GB/s.

    PYTHONPATH=. python benchmarks/bench_lora_gather.py            # the table
    PYTHONPATH=. python benchmarks/bench_lora_gather.py --quick    # harness check
"""
from __future__ import annotations

import argparse
import statistics
import sys

import torch

from benchmarks.common import interleaved_times
from pyengine import _ext
from pyengine.ops.lora_gather import lora_gather, reference_lora_gather

CASES = [(8, 4, 16, 576, 576), (8, 4, 16, 2048, 8192)]  # rows, adapters, rank, K, N


def case(rows, adapters, rank, k, n, bank_mb):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, k, generator=g)
    idx = torch.arange(rows) % adapters
    bank_bytes = 4 * adapters * rank * (k + n)
    copies = max(2, bank_mb * 2 ** 20 // bank_bytes)
    banks = [(torch.randn(adapters, rank, k, generator=g),
              torch.randn(adapters, n, rank, generator=g)) for _ in range(copies)]
    y = torch.zeros(rows, n)
    turn = {"c++": 0, "op": 0, "torch": 0}

    def bank(name):
        turn[name] = (turn[name] + 1) % copies
        return banks[turn[name]]

    def ours_cpp():
        a, b = bank("c++")
        _ext._C.lora_gather_add(x.data_ptr(), rows, k, idx.data_ptr(), a.data_ptr(),
                                b.data_ptr(), adapters, rank, n, y.data_ptr(), _ext.num_threads())

    def ours_op():
        lora_gather(x, *bank("op"), idx, backend="cpu")

    def torch_ref():
        reference_lora_gather(x, *bank("torch"), idx)

    floor = bank_bytes + 4 * rows * (k + 2 * n)
    return {"ours C++": ours_cpp, "ours op": ours_op, "torch": torch_ref}, floor


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=50, help="timed calls per implementation")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, torch.get_num_threads()])
    ap.add_argument("--bank-mb", type=int, default=256, help="bank copies rotated, in all")
    ap.add_argument("--quick", action="store_true", help="harness check: 3 rounds, 16 MB")
    a = ap.parse_args(argv)
    if _ext._C is None:
        print(f"error: {_ext.EXT_ERROR}", file=sys.stderr)
        return 2
    if a.quick:
        a.rounds, a.bank_mb = 3, 16
    print("| rows x adapters, rank, K, N | threads | ours C++ us | ours op us | torch us "
          "| torch / ours C++ | ours C++ GB/s (floor) |")
    print("|---|---|---|---|---|---|---|")
    for rows, adapters, rank, k, n in CASES:
        fns, floor = case(rows, adapters, rank, k, n, a.bank_mb)
        for t in dict.fromkeys(a.threads):
            torch.set_num_threads(t)
            med = {name: statistics.median(ts)
                   for name, ts in interleaved_times(fns, repeats=a.rounds, warmup=2).items()}
            print(f"| {rows} x {adapters}, {rank}, {k}, {n} | {t} | {med['ours C++'] * 1e6:.1f} "
                  f"| {med['ours op'] * 1e6:.1f} | {med['torch'] * 1e6:.1f} "
                  f"| {med['torch'] / med['ours C++']:.2f} | {floor / med['ours C++'] / 1e9:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
