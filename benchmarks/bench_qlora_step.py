"""QLoRA end to end: a `--quant nf4|q4_0|q8_0` LoRA step vs the bf16 LoRA step (issue 9
targets: <= 1.25x the time, peak memory below it).

Same model and data as bench_finetune (SmolLM-135M-like Llama, LAYERS layers, random
init), LoRA r 16 all-linear, bf16, batch 4.  Each run is a fresh process with the
environment `python -m pyengine.finetune` gives itself (OMP_WAIT_POLICY=PASSIVE), the
formats alternate over ROUNDS rounds; step time = median of steps 2..STEPS of
`Run.accumulate + Run.update`, peak memory = the process's VmHWM.

    PYTHONPATH=. python benchmarks/bench_qlora_step.py [--layers 8] [--seq 256] [--quant nf4] [--rounds 3]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.bench_finetune import make_inputs, peak_rss_mb

STEPS = 6


def worker(quant: str, model_dir: str, data: str, seq: int) -> dict:
    from pyengine.finetune import trainer as T
    from pyengine.finetune.config import FinetuneConfig
    with tempfile.TemporaryDirectory() as out:
        run = T.Run(FinetuneConfig(model=model_dir, data=data, task="causal-lm", method="lora",
                                   lora_r=16, lora_alpha=32, target_modules="all-linear",
                                   max_steps=STEPS, batch_size=4, lr=1e-3, warmup_ratio=0.0,
                                   max_seq_len=seq, dtype="bf16", output=out, progress=False,
                                   seed=0, quant=quant))
        seconds = []
        for step in range(STEPS):
            t = time.perf_counter()
            run.accumulate(step)
            run.update()
            seconds.append(time.perf_counter() - t)
    return dict(step_s=statistics.median(seconds[1:]), peak_mb=peak_rss_mb())


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--quant", default="nf4", choices=["nf4", "q4_0", "q8_0"])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--worker", nargs=3, metavar=("QUANT", "MODEL", "DATA"))
    a = p.parse_args()
    if a.worker:
        print(json.dumps(worker(*a.worker, a.seq)))
        return
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env.update(OMP_WAIT_POLICY="PASSIVE", PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    results = {"none": [], a.quant: []}
    with tempfile.TemporaryDirectory() as d:
        model_dir, data = make_inputs(Path(d), a.layers, rows=4 * STEPS)
        for _ in range(a.rounds):
            for quant in results:
                proc = subprocess.run([sys.executable, __file__, "--seq", str(a.seq), "--worker",
                                       quant, model_dir, data], capture_output=True, text=True,
                                      env=env)
                if proc.returncode:
                    raise RuntimeError(f"{quant} worker failed:\n{proc.stderr[-4000:]}")
                results[quant].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    med = {q: {k: statistics.median(r[k] for r in rs) for k in ("step_s", "peak_mb")}
           for q, rs in results.items()}
    base, quant = med["none"], med[a.quant]
    print(f"layers={a.layers} seq={a.seq} batch=4 bf16 LoRA r=16, {a.rounds} rounds")
    print(f"| | bf16 base | {a.quant} base | ratio |\n|---|---|---|---|")
    print(f"| step (median) | {base['step_s']:.3f} s | {quant['step_s']:.3f} s | "
          f"{quant['step_s'] / base['step_s']:.2f}x (target <= 1.25x) |")
    print(f"| peak RSS (VmHWM) | {base['peak_mb']:.0f} MB | {quant['peak_mb']:.0f} MB | "
          f"{quant['peak_mb'] / base['peak_mb']:.2f}x (target < 1x) |")


if __name__ == "__main__":
    main()
