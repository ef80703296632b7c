"""LoRA fine-tune, pyengine vs HF Trainer + PEFT, same model / data / steps / hparams.

Model: Llama architecture at SmolLM-135M width (hidden 576, intermediate 1536, 9 heads,
3 kv heads, vocab 49152), random init, LAYERS layers (SmolLM has 30; fewer keeps the
run short, and the per-layer work is what both sides share).  Data: packed-free rows of
exactly 512 tokens (long texts of the bundled sentiment set truncated to 512, tokenised
with the MiniLM WordPiece tokenizer), loss on every token.  r=16, alpha=32 on all linear
layers, bf16, batch 4, AdamW lr 1e-3, cosine, no warmup.

Each side runs in a fresh subprocess with the environment its user would give it:
pyengine with OMP_WAIT_POLICY=PASSIVE (what `python -m pyengine.finetune` sets for itself,
pyengine/cli.py), HF Trainer with the caller's environment minus any OMP_WAIT_POLICY
(HF sets none).  tokens/s is the median over the steps after the first (warm-up), peak
memory is that process's VmHWM (/proc/self/status).

    python benchmarks/bench_finetune.py [--layers 8] [--seq 512] [--steps 6]  # the table
    pytest benchmarks/bench_finetune.py                                 # same, with gates
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

import pytest

ROOT = Path(__file__).resolve().parent.parent
BATCH, LR, RANK, ALPHA = 4, 1e-3, 16, 32


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def make_inputs(directory: Path, layers: int, rows: int) -> tuple[str, str]:
    """A random-init SmolLM-shaped Llama dir (with the MiniLM tokenizer) and a JSONL of
    `rows` texts, each longer than 512 tokens."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from pyengine.finetune.config import DATASETS_DIR, minilm_dir
    tok = AutoTokenizer.from_pretrained(minilm_dir())
    cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                      num_hidden_layers=layers, num_attention_heads=9, num_key_value_heads=3,
                      max_position_embeddings=2048, tie_word_embeddings=True,
                      pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model_dir = directory / "model"
    LlamaForCausalLM(cfg).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    texts = [json.loads(line)["text"] for line in
             (DATASETS_DIR / "sentiment_train.jsonl").read_text().splitlines()]
    per_row = 40  # sentences per row: > 512 WordPiece tokens
    data = directory / "train.jsonl"
    with open(data, "w") as f:
        for r in range(rows):
            start = (r * 17) % len(texts)
            f.write(json.dumps({"text": " ".join((texts * 2)[start:start + per_row])}) + "\n")
    return str(model_dir), str(data)


# --------------------------------------------------------------------------- workers
def worker_pyengine(model_dir, data, steps, seq, out):
    from pyengine.finetune import run
    r = run(dict(model=model_dir, data=data, task="causal-lm", method="lora", lora_r=RANK,
                 lora_alpha=ALPHA, target_modules="all-linear", max_steps=steps,
                 batch_size=BATCH, lr=LR, warmup_ratio=0.0, max_seq_len=seq, dtype="bf16",
                 output=out, log_every=1, progress=False, seed=0))
    timing = [json.loads(line) for line in (Path(out) / "timing.jsonl").read_text().splitlines()]
    return dict(losses=r["losses"], tokens_per_s=[m["tokens_per_s"] for m in timing])


def worker_hf(model_dir, data, steps, seq, out, prepare=None, sft=False):
    """HF Trainer + PEFT (sft: trl.SFTTrainer, which tokenizes the "text" rows itself, to
    max_length=seq, packing off); prepare(peft_model) -> model runs before the trainer is
    built (bench_hf_trainer.py: pyengine.patch).  tokens/s counts each step's non-padding
    tokens (the trainer's num_input_tokens_seen)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import (AutoModelForCausalLM, AutoTokenizer, Trainer, TrainerCallback,
                              TrainingArguments)

    from pyengine.data import Dataset
    tok = AutoTokenizer.from_pretrained(model_dir)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0,
                                             target_modules="all-linear", task_type="CAUSAL_LM"))
    if prepare is not None:
        model = prepare(model)

    class Times(TrainerCallback):
        def __init__(self):
            self.t, self.seen, self.seconds, self.tokens, self.losses = 0.0, 0, [], [], []

        def on_step_begin(self, args, state, control, **k):
            self.t, self.seen = time.perf_counter(), state.num_input_tokens_seen

        def on_step_end(self, args, state, control, **k):
            self.seconds.append(time.perf_counter() - self.t)
            self.tokens.append(state.num_input_tokens_seen - self.seen)

        def on_log(self, args, state, control, logs=None, **k):
            if logs and "loss" in logs:
                self.losses.append(logs["loss"])
    times = Times()
    common = dict(output_dir=out, per_device_train_batch_size=BATCH, max_steps=steps,
                  learning_rate=LR, lr_scheduler_type="cosine", warmup_steps=0,
                  weight_decay=0.0, max_grad_norm=1.0, bf16=True, use_cpu=True,
                  logging_steps=1, save_strategy="no", eval_strategy="no", report_to=[],
                  seed=0, dataloader_num_workers=0, disable_tqdm=True,
                  include_num_input_tokens_seen="non_padding")
    if sft:
        import datasets
        import trl
        rows = datasets.Dataset.from_list(  # in memory: no datasets cache files
            [json.loads(line) for line in Path(data).read_text().splitlines()])
        # the MiniLM tokenizer has no EOS; TRL appends one to each text (cut by truncation)
        sft_args = trl.SFTConfig(**common, max_length=seq, packing=False,
                                 eos_token=tok.eos_token or tok.sep_token)
        trainer = trl.SFTTrainer(model=model, args=sft_args, train_dataset=rows,
                                 processing_class=tok, callbacks=[times])
    else:
        rows = [dict(input_ids=e.input_ids, attention_mask=[1] * len(e.input_ids),
                     labels=e.labels) for e in Dataset(data, "causal-lm", tok, seq).examples]
        trainer = Trainer(model=model, args=TrainingArguments(**common), train_dataset=rows,
                          callbacks=[times])
    trainer.train()
    return dict(losses=times.losses, tokens=times.tokens,
                tokens_per_s=[n / s for n, s in zip(times.tokens, times.seconds)])


WORKERS = {"pyengine": worker_pyengine, "hf": worker_hf}


def worker_env(side: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env["PYTHONPATH"] = str(ROOT)
    if side == "pyengine":
        env["OMP_WAIT_POLICY"] = "PASSIVE"  # what the pyengine.finetune CLI gives itself
    return env


def measure(side: str, model_dir: str, data: str, steps: int, seq: int, script: str = __file__,
            env: dict | None = None) -> dict:
    """Run `script --worker side` in a fresh process (env: worker_env(side) unless given)."""
    with tempfile.TemporaryDirectory() as out:
        proc = subprocess.run([sys.executable, script, "--worker", side, "--model", model_dir,
                               "--data", data, "--steps", str(steps), "--seq", str(seq),
                               "--out", out],
                              capture_output=True, text=True, env=env or worker_env(side))
    if proc.returncode:
        raise RuntimeError(f"{side} worker failed:\n{proc.stderr[-4000:]}")
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    r["median_tokens_per_s"] = statistics.median(r["tokens_per_s"][1:] or r["tokens_per_s"])
    return r


def compare(layers: int = 8, steps: int = 6, seq: int = 512) -> dict:
    with tempfile.TemporaryDirectory() as d:
        model_dir, data = make_inputs(Path(d), layers, rows=BATCH * steps)
        ours = measure("pyengine", model_dir, data, steps, seq)
        hf = measure("hf", model_dir, data, steps, seq)
    return dict(layers=layers, steps=steps, seq=seq, ours=ours, hf=hf,
                speedup=ours["median_tokens_per_s"] / hf["median_tokens_per_s"],
                memory_ratio=ours["peak_rss_mb"] / hf["peak_rss_mb"],
                loss_rel_diff=abs(ours["losses"][-1] - hf["losses"][-1]) / hf["losses"][-1])


def table(r: dict) -> str:
    o, h = r["ours"], r["hf"]
    return "\n".join([
        "| | pyengine | HF Trainer + PEFT | ratio |", "|---|---|---|---|",
        f"| tokens/s (median, steps 2..{r['steps']}) | {o['median_tokens_per_s']:.0f} | "
        f"{h['median_tokens_per_s']:.0f} | {r['speedup']:.2f}x (target >= 2x) |",
        f"| peak RSS (VmHWM) | {o['peak_rss_mb']:.0f} MB | {h['peak_rss_mb']:.0f} MB | "
        f"{r['memory_ratio']:.2f}x (target <= 0.5x) |",
        f"| final loss (step {r['steps']}) | {o['losses'][-1]:.4f} | {h['losses'][-1]:.4f} | "
        f"{100 * r['loss_rel_diff']:.2f}% apart (target <= 1%) |"])


def test_finetune_vs_hf_trainer(benchmark):
    r = benchmark.pedantic(compare, rounds=1, iterations=1)
    benchmark.extra_info.update(speedup=r["speedup"], memory_ratio=r["memory_ratio"],
                                loss_rel_diff=r["loss_rel_diff"])
    print("\n" + table(r))
    assert r["loss_rel_diff"] <= 0.01
    missed = [f"{r['speedup']:.2f}x HF's tokens/s (target 2x)"] if r["speedup"] < 2.0 else []
    missed += [f"{r['memory_ratio']:.2f}x HF's peak memory (target 0.5x)"] if r["memory_ratio"] > 0.5 else []
    if missed:
        pytest.xfail("targets not met: " + "; ".join(missed))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--seq", type=int, default=512, help="tokens per row (<= 512)")
    p.add_argument("--worker", choices=sorted(WORKERS))
    p.add_argument("--model"), p.add_argument("--data"), p.add_argument("--out")
    a = p.parse_args()
    if a.worker:
        r = WORKERS[a.worker](a.model, a.data, a.steps, a.seq, a.out)
        r["peak_rss_mb"] = peak_rss_mb()
        print(json.dumps(r))
        return
    r = compare(a.layers, a.steps, a.seq)
    print(f"layers={r['layers']} steps={r['steps']} seq={r['seq']} batch={BATCH} r={RANK}")
    print(table(r))
    print(json.dumps({k: r[k] for k in ("speedup", "memory_ratio", "loss_rel_diff")}))


if __name__ == "__main__":
    main()
