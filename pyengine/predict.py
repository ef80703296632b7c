"""python -m pyengine.predict --model DIR [--adapter DIR] --data FILE.jsonl [--output FILE.jsonl]
    [--batch-size N] [--max-seq-len N] [--force]

Batch prediction with a fine-tuned classifier: a seq-cls / token-cls LoRA adapter
(pyengine.finetune's output, or PEFT's with the head in modules_to_save) on its base
model, or a fine-tuned model directory. The task and class names come from the adapter's
adapter_config.json task_type and labels.json, else from the model's config.json
(architectures, id2label).

Input: one JSON object per line (blank lines skipped), {"text": str} for seq-cls,
{"tokens": [str, ...]} for token-cls; other keys (e.g. a gold label) are ignored.
Output: one JSON line per input object, in order: seq-cls {"label": name,
"probabilities": {name: p}} (softmax of the fp32 logits); token-cls {"tags": [name per
word]} (the word's first sub-token, as training labels it). seq-cls texts longer than
--max-seq-len are truncated as in training; a token-cls row longer is an error.
Errors print `error: ...` (bad rows as file:line) and exit 2; --output is written only
when every row was predicted, and an existing file only with --force."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from pyengine import data as D
from pyengine import models as M
from pyengine.cli import passive_openmp, positive_int


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pyengine.predict",
                                description="Predict labels with a fine-tuned seq-cls / "
                                            "token-cls model or adapter.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True, help="Hugging Face model directory (the base "
                                                  "model of --adapter, or a fine-tuned one)")
    p.add_argument("--adapter", help="LoRA adapter directory (with labels.json)")
    p.add_argument("--data", required=True, help='JSONL of {"text"} (seq-cls) or {"tokens"} '
                                                 '(token-cls) rows')
    p.add_argument("--output", help="JSONL file to write (none: stdout)")
    p.add_argument("--batch-size", type=positive_int, default=32, help="rows per forward")
    p.add_argument("--max-seq-len", type=positive_int, default=512,
                   help="tokens per row at most")
    p.add_argument("--force", action="store_true", help="overwrite an existing --output")
    return p.parse_args(argv)


def load_classifier(model_dir: str, adapter: str | None = None):
    """(task, class names, tokenizer, fp32 model in eval mode) of a saved classifier."""
    task, labels = M.saved_task(model_dir, adapter)
    where = adapter or model_dir
    if task not in ("seq-cls", "token-cls"):
        raise ValueError(f"{where} is not a seq-cls / token-cls classifier (task "
                         f"{task or 'unknown'}); pyengine.predict labels text, use "
                         f"pyengine.infer to generate")
    if labels is None:
        raise ValueError(f"{where}: no class names (labels.json beside the adapter, or "
                         f"id2label in config.json)")
    tokenizer = M.load_tokenizer(model_dir)
    model = M.load_model(model_dir, task, labels, tokenizer.pad_token_id)
    if adapter is not None:
        from pyengine.lora import load_adapter
        load_adapter(model, adapter)
    return task, labels, tokenizer, model.eval()


def encode(records: list[D.Record], task: str, tokenizer, max_len: int) -> list[D.Example]:
    """Token ids per row; for token-cls, labels mark each word's first sub-token (0)."""
    examples = []
    for rec in records:
        if task == "seq-cls":
            text = D._field(rec, "text", str, "seq-cls prediction needs text")
            ids = tokenizer(text)["input_ids"]
            examples.append(D.Example(D.truncate(ids, max_len, tokenizer), 0))
            continue
        tokens = D.words(rec, "token-cls prediction needs tokens")
        ids, firsts = D.label_first_subtokens(tokenizer, tokens, [0] * len(tokens))
        if len(ids) > max_len:
            raise ValueError(f"{rec.where}: {len(ids)} tokens, more than --max-seq-len {max_len}")
        examples.append(D.Example(ids, firsts))
    return examples


@torch.no_grad()
def predict(task: str, labels: list[str], model, examples: list[D.Example], pad_id: int,
            batch_size: int) -> list[dict]:
    rows = []
    for s in range(0, len(examples), batch_size):
        batch = D.collate(examples[s:s + batch_size], pad_id)
        logits = M.classification_logits(model, batch)
        if task == "seq-cls":
            for p in torch.softmax(logits, -1).tolist():
                best = max(range(len(p)), key=p.__getitem__)
                rows.append(dict(label=labels[best], probabilities=dict(zip(labels, p))))
        else:
            for firsts, pred in zip(batch["labels"], logits.argmax(-1)):
                rows.append(dict(tags=[labels[i] for i in pred[firsts != D.IGNORE].tolist()]))
    return rows


def write_output(rows: list[dict], path: str | None, force: bool):
    text = "".join(json.dumps(r) + "\n" for r in rows)
    if path is None:
        sys.stdout.write(text)
        return
    tmp = Path(f"{path}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)  # whole or not at all


def check_output(args):
    if args.output is None:
        return
    out = Path(args.output)
    if out.is_dir():
        raise ValueError(f"--output {args.output} is a directory (pass a file)")
    if out.exists() and out.resolve() == Path(args.data).resolve():
        raise ValueError(f"--output {args.output} is the --data file")
    if out.exists() and not args.force:
        raise ValueError(f"--output {args.output} exists; pass --force to overwrite it")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"--output {args.output}: directory {out.parent} does not exist")


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        check_output(args)
        records = D.read_jsonl(args.data)
        task, labels, tokenizer, model = load_classifier(args.model, args.adapter)
        examples = encode(records, task, tokenizer, args.max_seq_len)
        rows = predict(task, labels, model, examples, tokenizer.pad_token_id, args.batch_size)
        write_output(rows, args.output, args.force)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    passive_openmp()
    sys.exit(main())
