"""Hugging Face integration: load local model directories for the three tasks, their
training losses and their evaluation.

The causal-lm loss never materialises logits: the decoder's last hidden states at the
labelled positions go with the LM-head weight into pyengine.ops.fused_linear_cross_entropy.
Losses are normalised by `num_items` (labelled tokens, or examples for seq-cls, in the
whole gradient-accumulation window), so accumulated gradients equal the full-batch ones;
a window with no labelled token gives loss 0 and zero gradients, never NaN.

Everything loads with local_files_only=True (no hub access, and no process-wide hub
environment variables).  What cannot be trained (an encoder for causal-lm, a corrupt
or incomplete directory; GPT-2's Conv1D layers are refused by apply_lora) is a ValueError /
FileNotFoundError naming the directory and the problem.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError

from pyengine.backends import backends, resolve
from pyengine.data import IGNORE
from pyengine.patching import causal_lm_loss as fused_causal_lm_loss

# any one of these makes a tokenizer (tokenizer_config.json alone does not)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model", "sentencepiece.bpe.model", "tokenizer.tiktoken")


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (library errors can run to pages)."""
    return (str(e).splitlines() or [type(e).__name__])[0]


def check_backends() -> None:
    """Resolve every op's backend for CPU tensors now, so that e.g. PYENGINE_BACKEND=triton
    without a GPU is a clear error before a run writes anything."""
    for op in backends():
        resolve(op, None, torch.device("cpu"))  # raises BackendUnavailable (a ValueError)


def _check_dir(path: str) -> Path:
    p = Path(path)
    if p.is_file():
        hint = p.parent if p.name == "config.json" else "the directory holding config.json"
        raise ValueError(f"model {path} is a file: pass the model directory ({hint})")
    if not p.is_dir():
        raise FileNotFoundError(f"model directory {path} does not exist")
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"model directory {path} has no config.json (not a Hugging "
                                f"Face model directory)")
    return p


def load_tokenizer(path: str):
    from transformers import AutoTokenizer
    p = _check_dir(path)
    if not any((p / name).is_file() for name in TOKENIZER_FILES):
        raise FileNotFoundError(f"model directory {path} has no tokenizer files (one of "
                                f"{', '.join(TOKENIZER_FILES)}); save the tokenizer there too")
    try:
        tok = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
    except (OSError, ValueError, TypeError) as e:
        raise ValueError(f"model directory {path}: cannot load the tokenizer: "
                         f"{first_line(e)}") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    return tok


def _check_task(path: str, task: str):
    """An encoder (BERT-like, or encoder-decoder) cannot be trained as a causal LM."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}/config.json: {first_line(e)}") from None
    if task == "causal-lm" and (config.is_encoder_decoder
                                or config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES):
        raise ValueError(f"model {path} is an encoder ({config.model_type}): task causal-lm "
                         f"needs a decoder-only language model (e.g. Llama); an encoder can "
                         f"be trained with --task seq-cls or token-cls")


def load_model(path: str, task: str, labels: list[str] | None, pad_token_id: int | None):
    """fp32 model for `task` from a local HF directory (heads of new tasks are initialised
    from the current torch RNG)."""
    import transformers
    auto = {"causal-lm": transformers.AutoModelForCausalLM,
            "seq-cls": transformers.AutoModelForSequenceClassification,
            "token-cls": transformers.AutoModelForTokenClassification}[task]
    kwargs = {}
    if labels is not None:
        kwargs = dict(num_labels=len(labels), id2label=dict(enumerate(labels)),
                      label2id={n: i for i, n in enumerate(labels)})
    _check_task(str(_check_dir(path)), task)
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # "newly initialized head" is expected here
    try:
        model = auto.from_pretrained(path, local_files_only=True, dtype=torch.float32, **kwargs)
    except (OSError, ValueError, RuntimeError, SafetensorError) as e:
        raise ValueError(f"model directory {path}: cannot load the model: "
                         f"{first_line(e)}") from None
    finally:
        transformers.logging.set_verbosity(verbosity)
    if pad_token_id is not None and model.config.pad_token_id is None:
        model.config.pad_token_id = pad_token_id
    return model


TASK_TYPES = {"CAUSAL_LM": "causal-lm", "SEQ_CLS": "seq-cls", "TOKEN_CLS": "token-cls"}  # PEFT's
LABELS_NAME = "labels.json"  # id2label / label2id beside a seq-cls / token-cls adapter
ARCHITECTURE_SUFFIXES = {"ForCausalLM": "causal-lm", "ForSequenceClassification": "seq-cls",
                         "ForTokenClassification": "token-cls"}


def _json_file(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def _id2label(mapping, where: Path) -> list[str]:
    """{"0": name, "1": name, ...} -> [name, ...]; anything else is a ValueError."""
    if not isinstance(mapping, dict) or sorted(mapping, key=str) != sorted(
            map(str, range(len(mapping)))) or not all(isinstance(v, str) for v in mapping.values()):
        raise ValueError(f"{where}: id2label must map 0..n-1 to class names, got {mapping!r}")
    return [mapping[k] for k in sorted(mapping, key=int)]


def saved_task(model_dir: str, adapter_dir: str | None = None
               ) -> tuple[str | None, list[str] | None]:
    """The task and class names a fine-tuned model was saved with: an adapter's
    adapter_config.json task_type and labels.json (pyengine.finetune writes it), else the
    model's config.json architectures and id2label. None where nothing says."""
    task = labels = None
    if adapter_dir is not None:
        adapter = Path(adapter_dir)
        config = _json_file(adapter / "adapter_config.json")
        task = TASK_TYPES.get(config.get("task_type"))
        if (adapter / LABELS_NAME).is_file():
            labels = _id2label(_json_file(adapter / LABELS_NAME).get("id2label"),
                               adapter / LABELS_NAME)
    config_file = _check_dir(model_dir) / "config.json"
    config = _json_file(config_file)
    arch = (config.get("architectures") or [""])[0]
    model_task = next((t for suffix, t in ARCHITECTURE_SUFFIXES.items() if arch.endswith(suffix)),
                      None)
    task = task or model_task
    if labels is None and model_task in ("seq-cls", "token-cls") and "id2label" in config:
        labels = _id2label(config["id2label"], config_file)
    return task, labels


def head_modules(model) -> list[str]:
    """Names of the task head modules beside the base model (e.g. ['classifier'], ['score']);
    trained in full under LoRA (PEFT's modules_to_save)."""
    return [name for name, m in model.named_children()
            if name != model.base_model_prefix and any(True for _ in m.parameters())]


def count_items(task: str, labels: torch.Tensor) -> int:
    """What the loss is averaged over: labelled next-token targets / examples / tokens."""
    if task == "causal-lm":
        return int((labels[:, 1:] != IGNORE).sum())
    if task == "seq-cls":
        return labels.shape[0]
    return int((labels != IGNORE).sum())


def causal_lm_loss(model, batch, num_items, compute_dtype, reduction="mean", filter_eps=None):
    """The decoder's hidden states into pyengine.patching.causal_lm_loss (the fused loss the
    patched forward computes too), in compute_dtype."""
    hidden = model.get_decoder()(input_ids=batch["input_ids"],
                                 attention_mask=batch["attention_mask"]).last_hidden_state
    return fused_causal_lm_loss(model, hidden, batch["labels"], num_items=num_items,
                                filter_eps=filter_eps, reduction=reduction, dtype=compute_dtype)


def classification_logits(model, batch):
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()


def training_loss(task, model, batch, num_items, compute_dtype, ce_filter_eps=None):
    """Sum of the batch's losses / num_items of the whole accumulation window.
    ce_filter_eps: causal-lm's LM-head gradient filter (fused_linear_cross_entropy)."""
    if task == "causal-lm":
        return causal_lm_loss(model, batch, max(num_items, 1), compute_dtype,
                              filter_eps=ce_filter_eps)
    logits = classification_logits(model, batch)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["labels"].reshape(-1),
                           ignore_index=IGNORE, reduction="sum")
    return loss / max(num_items, 1)


@torch.no_grad()
def evaluate(task, model, batches, compute_dtype, label_names=None) -> dict:
    """causal-lm: loss and perplexity over labelled tokens.  Classification: loss,
    accuracy and per-class precision / recall / F1 / support, macro F1, the confusion
    matrix; token-cls also entity-level scores (pyengine.metrics) over the words' tags."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    confusion = None
    sentences = []  # token-cls: (gold ids, predicted ids) per row, one per word
    try:
        for batch in batches:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=compute_dtype == torch.bfloat16):
                if task == "causal-lm":
                    n = count_items(task, batch["labels"])
                    if n:
                        total += float(causal_lm_loss(model, batch, None, compute_dtype, "sum"))
                    count += n
                    continue
                logits = classification_logits(model, batch)
            if task == "token-cls":
                for gold, pred in zip(batch["labels"], logits.argmax(-1)):
                    keep = gold != IGNORE
                    sentences.append((gold[keep].tolist(), pred[keep].tolist()))
            labels = batch["labels"].reshape(-1)
            logits = logits.reshape(-1, logits.shape[-1])
            keep = labels != IGNORE
            logits, labels = logits[keep], labels[keep]
            total += float(F.cross_entropy(logits, labels, reduction="sum"))
            count += labels.numel()
            k = logits.shape[-1]
            if confusion is None:
                confusion = torch.zeros(k, k, dtype=torch.long)
            confusion += torch.bincount(labels * k + logits.argmax(-1),
                                        minlength=k * k).reshape(k, k)
    finally:
        model.train(was_training)
    loss = total / max(count, 1)
    if task == "causal-lm":
        return dict(loss=loss, perplexity=math.exp(min(loss, 700.0)), tokens=count)
    report = dict(loss=loss, **classification_report(confusion, label_names))
    if task == "token-cls":
        from pyengine.metrics import entity_report
        report["entities"] = entity_report(*([[label_names[i] for i in s] for s in part]
                                             for part in zip(*sentences)))
    return report


def classification_report(confusion: torch.Tensor, names: list[str]) -> dict:
    """confusion[true, predicted] -> accuracy, per-class precision/recall/F1/support, macro F1."""
    tp = confusion.diag().double()
    predicted, actual = confusion.sum(0).double(), confusion.sum(1).double()
    precision = tp / predicted.clamp_min(1)
    recall = tp / actual.clamp_min(1)
    f1 = 2 * precision * recall / (precision + recall).clamp_min(1e-12)
    per_class = {name: dict(precision=float(precision[i]), recall=float(recall[i]),
                            f1=float(f1[i]), support=int(actual[i]))
                 for i, name in enumerate(names)}
    return dict(accuracy=float(tp.sum() / actual.sum().clamp_min(1)),
                macro_f1=float(f1.mean()), examples=int(actual.sum()), per_class=per_class,
                confusion=confusion.tolist())
