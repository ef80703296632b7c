"""HF Trainer and TRL SFTTrainer + PEFT LoRA: unpatched vs `pyengine.patch(model)`.

Model and data as benchmarks/bench_finetune.py (make_inputs): a random-init Llama at
SmolLM-135M width (hidden 576, intermediate 1536, 9 / 3 heads, vocab 49152), LAYERS layers
(SmolLM has 30), rows of exactly SEQ tokens.  PEFT LoRA r=16, alpha=32 on all linear
layers, bf16=True (CPU autocast), batch 4, AdamW lr 1e-3, cosine, no warmup, max_grad_norm 1
(bench_finetune.worker_hf, the same code for every side).  The patched side calls
`pyengine.patch(model)` on the PEFT model before building the trainer.

--trainer hf: transformers.Trainer on rows tokenized by pyengine.data (causal-lm).
--trainer sft: trl.SFTTrainer on the same JSONL "text" rows, tokenized by TRL itself
(max_length=SEQ, truncation, packing off), so its rows are SEQ tokens too (checked: every
side must see BATCH * SEQ non-padding tokens per step).  TRL computes the loss with its own
fused LM head (trl.trainer.utils.add_fused_lm_head, bound on the model when the trainer is
built), which pyengine.patch keeps: on this side pyengine's fused cross-entropy is not used,
and the gains come from the patched decoder layers.

Each side runs in a fresh subprocess with the same environment (HF's: the caller's minus
OMP_WAIT_POLICY), same seed, data and steps.  tokens/s is the step's non-padding tokens
over its time, median over the steps after the first; peak memory the process's VmHWM.

    python benchmarks/bench_hf_trainer.py [--trainer hf|sft|both] [--layers 30] [--steps 6]
                                          [--seq 512]                # the tables
    pytest benchmarks/bench_hf_trainer.py                            # with gates, per trainer
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: benchmarks/ is sys.path[0]
    sys.path.insert(0, str(ROOT))

from benchmarks.bench_finetune import (BATCH, RANK, make_inputs, measure, peak_rss_mb,  # noqa: E402
                                       worker_env, worker_hf)

SPEEDUP_TARGET, MEMORY_TARGET = 1.5, 0.6


TRAINERS = {"hf": "HF Trainer", "sft": "TRL SFTTrainer"}


def pyengine_patch(model):
    import pyengine
    return pyengine.patch(model)


def worker(side: str, *args) -> dict:
    """side: "<trainer>" (unpatched) or "<trainer>-patched"."""
    trainer, _, patched = side.partition("-")
    return worker_hf(*args, prepare=pyengine_patch if patched else None, sft=trainer == "sft")


WORKERS = [f"{t}{p}" for t in TRAINERS for p in ("", "-patched")]


def compare(layers: int = 30, steps: int = 6, seq: int = 512,
            trainers: tuple[str, ...] = ("hf", "sft")) -> dict:
    """{trainer: patched vs unpatched} plus the settings; raises if any side did not see
    BATCH * seq tokens in every step."""
    env = worker_env("hf")
    r = dict(layers=layers, steps=steps, seq=seq)
    with tempfile.TemporaryDirectory() as d:
        model_dir, data = make_inputs(Path(d), layers, rows=BATCH * steps)
        for t in trainers:
            plain, ours = (measure(side, model_dir, data, steps, seq, script=__file__, env=env)
                           for side in (t, f"{t}-patched"))
            for side, m in ((t, plain), (f"{t}-patched", ours)):
                if m["tokens"] != [BATCH * seq] * steps:
                    raise RuntimeError(f"{side}: tokens per step {m['tokens']}, expected "
                                       f"{steps} x {BATCH * seq} (rows of exactly {seq} tokens)")
            r[t] = dict(ours=ours, plain=plain,
                        speedup=ours["median_tokens_per_s"] / plain["median_tokens_per_s"],
                        memory_ratio=ours["peak_rss_mb"] / plain["peak_rss_mb"],
                        loss_rel_diff=max(abs(a - b) / b
                                          for a, b in zip(ours["losses"], plain["losses"])))
    return r


def table(r: dict, trainer: str) -> str:
    c, name = r[trainer], TRAINERS[trainer]
    o, h = c["ours"], c["plain"]
    return "\n".join([
        f"| | {name} + PEFT + pyengine.patch | {name} + PEFT | ratio |",
        "|---|---|---|---|",
        f"| tokens/s (median, steps 2..{r['steps']}) | {o['median_tokens_per_s']:.0f} | "
        f"{h['median_tokens_per_s']:.0f} | {c['speedup']:.2f}x (target >= {SPEEDUP_TARGET}x) |",
        f"| peak RSS (VmHWM) | {o['peak_rss_mb']:.0f} MB | {h['peak_rss_mb']:.0f} MB | "
        f"{c['memory_ratio']:.2f}x (target <= {MEMORY_TARGET}x) |",
        f"| loss, steps 1..{r['steps']} | {' '.join(f'{x:.4f}' for x in o['losses'])} | "
        f"{' '.join(f'{x:.4f}' for x in h['losses'])} | max {100 * c['loss_rel_diff']:.2f}% "
        "apart (target <= 1%) |"])


def check(benchmark, trainer: str):
    r = benchmark.pedantic(compare, kwargs=dict(trainers=(trainer,)), rounds=1, iterations=1)
    c = r[trainer]
    benchmark.extra_info.update({k: c[k] for k in ("speedup", "memory_ratio", "loss_rel_diff")})
    print("\n" + table(r, trainer))
    assert c["loss_rel_diff"] <= 0.01
    missed = ([f"{c['speedup']:.2f}x the unpatched tokens/s (target {SPEEDUP_TARGET}x)"]
              if c["speedup"] < SPEEDUP_TARGET else [])
    missed += ([f"{c['memory_ratio']:.2f}x the unpatched peak memory (target {MEMORY_TARGET}x)"]
               if c["memory_ratio"] > MEMORY_TARGET else [])
    if missed:
        pytest.xfail("targets not met: " + "; ".join(missed))


def test_hf_trainer_patched_vs_unpatched(benchmark):
    check(benchmark, "hf")


def test_sft_trainer_patched_vs_unpatched(benchmark):
    check(benchmark, "sft")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--trainer", choices=["hf", "sft", "both"], default="both")
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--seq", type=int, default=512, help="tokens per row (<= 512)")
    p.add_argument("--worker", choices=WORKERS)
    p.add_argument("--model"), p.add_argument("--data"), p.add_argument("--out")
    a = p.parse_args()
    if a.worker:
        r = worker(a.worker, a.model, a.data, a.steps, a.seq, a.out)
        r["peak_rss_mb"] = peak_rss_mb()
        print(json.dumps(r))
        return
    trainers = tuple(TRAINERS) if a.trainer == "both" else (a.trainer,)
    r = compare(a.layers, a.steps, a.seq, trainers)
    print(f"layers={r['layers']} steps={r['steps']} seq={r['seq']} batch={BATCH} r={RANK} bf16")
    for t in trainers:
        print(f"\n{TRAINERS[t]}:\n{table(r, t)}")
        print(json.dumps({k: r[t][k] for k in ("speedup", "memory_ratio", "loss_rel_diff")}))


if __name__ == "__main__":
    main()
