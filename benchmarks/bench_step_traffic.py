"""Copy and dtype-conversion traffic of one pyengine LoRA training step (bf16, forward +
backward + optimizer), counted exactly: every aten copy / conversion op the step runs is
seen by a TorchDispatchMode and its bytes read + written are summed.  Run on the
bench_finetune model (SmolLM-135M-like Llama, LAYERS layers), once with pyengine's kernels
on the trained instance (what `python -m pyengine.finetune` runs) and once with HF's own
modules (norms, RoPE, SDPA) under the same LoRA ops, so the table shows what the kernels
removed and what is left.  Deterministic (no timing): bytes do not depend on the machine.

    python benchmarks/bench_step_traffic.py [--layers 8] [--seq 256]
"""
from __future__ import annotations

import argparse
import collections
import tempfile
from pathlib import Path
from unittest import mock

import torch
from torch.utils._python_dispatch import TorchDispatchMode

COPY_OPS = {"_to_copy", "copy_", "clone", "cat", "index_put_"}


class CopyTraffic(TorchDispatchMode):
    """Bytes read + written by copy / conversion ops, per (op, dtype in -> out)."""

    def __init__(self):
        super().__init__()
        self.bytes = collections.Counter()
        self.calls = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name in COPY_OPS:
            ins = [a for a in torch.utils._pytree.tree_leaves(args) if isinstance(a, torch.Tensor)]
            outs = [o for o in torch.utils._pytree.tree_leaves(out) if isinstance(o, torch.Tensor)]
            src = ins[-1] if name == "copy_" else ins[0]
            key = (name, f"{str(src.dtype)[6:]} -> {str(outs[0].dtype)[6:]}")
            moved = sum(o.numel() * o.element_size() for o in outs)
            moved += sum(t.numel() * t.element_size() for t in ins)
            self.bytes[key] += moved
            self.calls[key] += 1
        return out


def one_step(model_dir: str, data: str, seq: int, out: str, kernels: bool) -> CopyTraffic:
    from pyengine.finetune import trainer as T
    from pyengine.finetune.config import FinetuneConfig
    cfg = FinetuneConfig(model=model_dir, data=data, task="causal-lm", method="lora",
                         lora_r=16, lora_alpha=32, target_modules="all-linear", max_steps=2,
                         batch_size=4, lr=1e-3, warmup_ratio=0.0, max_seq_len=seq,
                         dtype="bf16", output=out, progress=False, seed=0)
    with mock.patch.object(T, "patch", T.patch if kernels else lambda m, **kw: m):
        run = T.Run(cfg)
    run.accumulate(0), run.update()  # warm-up (optimizer state allocated)
    with CopyTraffic() as traffic:
        run.accumulate(1), run.update()
    return traffic


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    a = p.parse_args()
    from benchmarks.bench_finetune import make_inputs
    with tempfile.TemporaryDirectory() as d:
        model_dir, data = make_inputs(Path(d), a.layers, rows=8)
        runs = {name: one_step(model_dir, data, a.seq, str(Path(d) / name), kernels)
                for name, kernels in (("HF modules", False), ("pyengine kernels", True))}
    keys = sorted(set().union(*(r.bytes for r in runs.values())),
                  key=lambda k: -max(r.bytes[k] for r in runs.values()))
    print(f"layers={a.layers} seq={a.seq} batch=4 bf16 LoRA r=16 all-linear: MB read + "
          f"written by copy / conversion ops in one step (calls)")
    print("| op | dtype | " + " | ".join(runs) + " |\n|---|---|" + "---|" * len(runs))
    for k in keys:
        print(f"| {k[0]} | {k[1]} | " + " | ".join(
            f"{r.bytes[k] / 1e6:.1f} ({r.calls[k]})" for r in runs.values()) + " |")
    print("| total | | " + " | ".join(f"{sum(r.bytes.values()) / 1e6:.1f} MB"
                                      for r in runs.values()) + " |")


if __name__ == "__main__":
    main()
