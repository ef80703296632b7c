"""Training curves with and without LM-head gradient filtering (fused_linear_cross_entropy
filter_eps): 200 steps of full fine-tuning of a small causal Llama (4 layers, H 256, V 32000,
random init) on the bundled sentiment texts as causal-lm data, seq 128, batch 4, bf16,
identical seeds.  Prints the per-run final losses (train: mean of the last 10 steps; eval:
the bundled validation texts) and their relative difference (the issue's 1% criterion).

    python -m benchmarks.curve_ce_filter [--steps 200] [--eps auto]
    # or both sides in parallel processes, then compare:
    python -m benchmarks.curve_ce_filter --only exact --save exact.json &
    python -m benchmarks.curve_ce_filter --only filtered --save filtered.json; wait
    python -m benchmarks.curve_ce_filter --compare exact.json filtered.json
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
import transformers

from pyengine.finetune import run
from tests.tiny_llama import save_tiny_tokenizer

DATASETS = Path(__file__).resolve().parents[1] / "pyengine" / "datasets"
MODEL = dict(vocab_size=32000, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
             tie_word_embeddings=False, bos_token_id=0, eos_token_id=1)


def texts_only(src: Path, dst: Path):
    """The sentiment JSONL as causal-lm data: {"text": ...} lines, labels dropped."""
    with open(src) as f, open(dst, "w") as out:
        for line in f:
            out.write(json.dumps({"text": json.loads(line)["text"]}) + "\n")


def make_model(path: Path):
    save_tiny_tokenizer(path)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(**MODEL))
    model.save_pretrained(path)


def curves(steps: int, eps_values: list) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_model(tmp / "model")
        for split in ("train", "val"):
            texts_only(DATASETS / f"sentiment_{split}.jsonl", tmp / f"{split}.jsonl")
        results = {}
        for eps in eps_values:
            r = run(dict(model=str(tmp / "model"), data=str(tmp / "train.jsonl"),
                         eval_data=str(tmp / "val.jsonl"), task="causal-lm", method="full",
                         max_seq_len=128, packing=True, batch_size=4, max_steps=steps,
                         lr=5e-4, dtype="bf16", seed=0, ce_filter_eps=eps,
                         output=str(tmp / f"out-{eps}"), progress=False, log_every=50))
            results[str(eps)] = r
            print(f"filter_eps={eps}: final train loss (last 10 steps) "
                  f"{sum(r['losses'][-10:]) / 10:.4f}, eval {r['eval_after']['loss']:.4f}",
                  flush=True)
    return results


def compare(exact: dict, filt: dict, steps: int):
    for what, a, b in (("train (last 10)", sum(exact["losses"][-10:]) / 10,
                        sum(filt["losses"][-10:]) / 10),
                       ("eval", exact["eval_after"]["loss"], filt["eval_after"]["loss"])):
        print(f"{what}: exact {a:.4f}  filtered {b:.4f}  relative difference "
              f"{abs(b - a) / abs(a):.2%}")
    worst = max(abs(x - y) / abs(x) for x, y in zip(exact["losses"], filt["losses"]))
    print(f"largest per-step relative difference over {steps} steps: {worst:.2%}")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--eps", default="auto", help="filter_eps of the filtered run")
    p.add_argument("--only", choices=("exact", "filtered"),
                   help="run one side and write its losses to --save (two processes in parallel)")
    p.add_argument("--save", help="JSON file for --only's result")
    p.add_argument("--compare", nargs=2, metavar=("EXACT_JSON", "FILTERED_JSON"),
                   help="compare two saved runs instead of training")
    args = p.parse_args()
    if args.compare:
        exact, filt = (json.loads(Path(f).read_text()) for f in args.compare)
        return compare(exact, filt, len(exact["losses"]))
    eps = args.eps if args.eps == "auto" else float(args.eps)
    sides = {"exact": [None], "filtered": [eps], None: [None, eps]}[args.only]
    res = curves(args.steps, sides)
    if args.only:
        r = res[str(sides[0])]
        Path(args.save).write_text(json.dumps({k: r[k] for k in ("losses", "eval_after")}))
    else:
        compare(res["None"], res[str(eps)], args.steps)


if __name__ == "__main__":
    main()
