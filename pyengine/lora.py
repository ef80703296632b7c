"""LoRA on Hugging Face models, with adapters interchangeable with PEFT's.

    model = apply_lora(model, r=16, alpha=32, dropout=0.0, target_modules="all-linear")
    save_adapter(model, "out/")     # adapter_config.json + adapter_model.safetensors
    load_adapter(model, "peft_dir/")  # adapters made by PEFT load too
    read_adapter("peft_dir/")       # the checked file contents (infer and export merge these)
    model = merge_lora(model)       # plain nn.Linear layers again (fp32 merge)
    quantize_base(model, "nf4")     # QLoRA: frozen bases quantized (also apply_lora(quant=))

Llama-family gated MLPs (gate_proj / up_proj / down_proj all adapted, SiLU, no bias, no
LoRA dropout) then run as one fused op (pyengine.nn.LoRAMLP, `fuse_mlp=True`); the
LoRALinear modules stay where they were inside it, so parameter names, adapter files and
the trainable count are the same fused or not.

File format (PEFT's): tensors `base_model.model.<module path>.lora_A.weight` [r, in] and
`.lora_B.weight` [out, r]; the config lists the adapted modules by full path so PEFT
adapts exactly those.  "all-linear" takes every nn.Linear except the output head
(the model's output embeddings, e.g. lm_head, or a `score` / `classifier` head), as PEFT
does for causal-LM and sequence-classification models.
"""
from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from pyengine.nn.lora import LoRALinear, lora_scaling
from pyengine.nn.lora_mlp import PROJECTIONS, LoRAMLP
from pyengine.quant import FORMATS, format_spec

log = logging.getLogger("pyengine")
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
HEAD_NAMES = ("score", "classifier")  # sequence-classification heads PEFT leaves alone


def _output_head_names(model: nn.Module) -> set[str]:
    heads = []
    get_out = getattr(model, "get_output_embeddings", None)
    if get_out is not None and get_out() is not None:
        heads.append(get_out())
    heads += [getattr(model, n) for n in HEAD_NAMES if isinstance(getattr(model, n, None), nn.Module)]
    return {name for name, m in model.named_modules() if any(m is h for h in heads)}


def _matches(names: list[str], target_modules) -> list[str]:
    """PEFT's rule for target_modules, except that a string which is a plain module name
    (letters, digits, "_", ".") and fullmatches no path means a list of that one name."""
    if isinstance(target_modules, str):
        hits = [n for n in names if re.fullmatch(target_modules, n)]
        if hits or not re.fullmatch(r"[\w.]+", target_modules):
            return hits
        target_modules = [target_modules]
    wanted = list(target_modules)  # module names or path suffixes, as in PEFT
    return [n for n in names if any(n == t or n.endswith("." + t) for t in wanted)]


def _conv1d_paths(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if type(m).__name__ == "Conv1D"
            and type(m).__module__.startswith("transformers")]


def _check_linear(model: nn.Module, path: str, where: str) -> None:
    """Raise AdapterError unless `path` is an nn.Linear of `model`."""
    try:
        m = model.get_submodule(path)
    except AttributeError:
        raise AdapterError(f"{where}, which this model does not have") from None
    if type(m).__name__ == "Conv1D":
        raise AdapterError(f"{where}: architecture not supported: Conv1D layers (GPT-2 style); "
                           "pyengine's LoRA adapts nn.Linear only")
    if not isinstance(m, nn.Linear):
        raise AdapterError(f"{where}, which is a {type(m).__name__}, not an nn.Linear")


def _select_targets(model: nn.Module, target_modules) -> list[str]:
    linear = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)
              and not isinstance(m, LoRALinear) and ".lora_" not in f".{name}"]
    conv1d = _conv1d_paths(model)
    if target_modules == "all-linear":
        heads = _output_head_names(model)
        targets, conv_hits = [n for n in linear if n not in heads], conv1d
    else:
        targets, conv_hits = _matches(linear, target_modules), _matches(conv1d, target_modules)
    if conv_hits:
        raise ValueError(f"apply_lora: architecture not supported: Conv1D layers (GPT-2 style), "
                         f"e.g. {conv_hits[0]!r}; pyengine's LoRA adapts nn.Linear only")
    if not targets:
        raise ValueError(f"apply_lora: no nn.Linear module matches target_modules={target_modules!r}")
    return targets


def _replace(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent_path) if parent_path else model, child, new)


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def fused_mlps(model: nn.Module) -> list[LoRAMLP]:
    """The LoRAMLP modules apply_lora put in (their LoRALinear stay in lora_modules)."""
    return [m for m in model.modules() if isinstance(m, LoRAMLP) and hasattr(m, "unfused_mlp")]


def _count(model: nn.Module) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def _fuse_mlps(model: nn.Module, backend: str | None) -> int:
    """Replace each gated MLP whose three projections are LoRALinear by a LoRAMLP sharing
    them; the MLP it replaces is kept on it (`unfused_mlp`) for merge_lora. MLPs that
    cannot fuse (bias, dropout, another activation, different scales) stay as they are."""
    fused, unfused = 0, {}
    for path, mlp in list(model.named_modules()):
        if not all(isinstance(getattr(mlp, n, None), LoRALinear) for n in PROJECTIONS):
            continue
        try:
            if getattr(mlp, "act_fn", None) is None:
                raise ValueError("no act_fn")
            new = LoRAMLP.from_lora_mlp(mlp, backend=backend)
        except (TypeError, ValueError) as e:
            unfused[path] = e
            continue
        object.__setattr__(new, "unfused_mlp", mlp)  # a plain attribute, not a submodule
        _replace(model, path, new)
        fused += 1
    if unfused:
        path, reason = next(iter(unfused.items()))
        log.debug("apply_lora: %d gated MLPs stay unfused (e.g. %s: %s)", len(unfused), path, reason)
    return fused


def _adapt(model, targets, ranks, alphas, dropout, rslora, backend, fuse_mlp):
    for p in model.parameters():
        p.requires_grad_(False)
    for path in targets:
        _replace(model, path, LoRALinear(model.get_submodule(path), ranks[path], alphas[path],
                                         dropout, rslora, backend))
    fused = _fuse_mlps(model, backend) if fuse_mlp else 0
    trainable, total = _count(model)
    model.lora_trainable_params = trainable
    log.info("apply_lora: %d modules adapted (%d gated MLPs fused); trainable params: %d of "
             "%d (%.3f%%)", len(targets), fused, trainable, total, 100.0 * trainable / max(total, 1))
    return model


def apply_lora(model: nn.Module, r: int = 16, alpha: float = 32, dropout: float = 0.0,
               target_modules="all-linear", rslora: bool = False,
               backend: str | None = None, quant: str | None = None,
               fuse_mlp: bool = True) -> nn.Module:
    """Replace the targeted nn.Linear modules by LoRALinear (in place; returns the model).
    Everything else is frozen; `model.lora_trainable_params` holds the trainable count.
    target_modules: "all-linear"; a list of module names / path suffixes (PEFT's rule); or
    a string, which is a regex that must fullmatch a module path (PEFT's rule) -- except that
    a plain name such as "q_proj" that fullmatches no path means ["q_proj"].
    Conv1D layers (GPT-2 style) are not supported: selecting one raises ValueError.
    quant: "nf4" | "q4_0" | "q8_0" quantizes the frozen bases (QLoRA, see quantize_base).
    fuse_mlp: run fully adapted Llama-family gated MLPs as one LoRAMLP op (quantized
    bases included)."""
    targets = _select_targets(model, target_modules)
    _adapt(model, targets, dict.fromkeys(targets, r), dict.fromkeys(targets, alpha),
           dropout, rslora, backend, fuse_mlp)
    return model if quant is None else quantize_base(model, quant)


def quantize_base(model: nn.Module, fmt: str) -> nn.Module:
    """QLoRA: quantize the frozen base weight of every LoRALinear to `fmt` (in place).
    Modules whose in_features is not a multiple of the format's block stay unquantized
    (logged).  Fused MLPs stay fused: they share these LoRALinear modules."""
    if fmt not in FORMATS:
        raise ValueError(f"quantize_base: unknown format {fmt!r} (one of {', '.join(FORMATS)})")
    block = format_spec(fmt).block
    done = 0
    for path, m in lora_modules(model).items():
        if m.quant_fmt is not None:
            continue
        if m.in_features % block:
            log.warning("quantize_base: %s left unquantized: in_features %d is not a multiple of "
                        "the %s block (%d)", path, m.in_features, fmt, block)
            continue
        m.quantize_base(fmt)
        done += 1
    log.info("quantize_base: %d LoRA base weights quantized to %s", done, fmt)
    return model


def _config(model: nn.Module, modules: dict[str, LoRALinear]) -> dict:
    first = next(iter(modules.values()))
    ranks = {m.r for m in modules.values()}
    alphas = {m.alpha for m in modules.values()}
    name_or_path = getattr(getattr(model, "config", None), "_name_or_path", None)
    return {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": name_or_path or None,
        "r": first.r, "lora_alpha": first.alpha, "lora_dropout": first.dropout,
        "use_rslora": first.rslora, "target_modules": sorted(modules),
        "rank_pattern": {} if len(ranks) == 1 else {n: m.r for n, m in modules.items()},
        "alpha_pattern": {} if len(alphas) == 1 else {n: m.alpha for n, m in modules.items()},
        "bias": "none", "fan_in_fan_out": False, "init_lora_weights": True,
        "inference_mode": True, "modules_to_save": None, "use_dora": False,
    }


def save_adapter(model: nn.Module, directory: str | os.PathLike) -> None:
    """Write the adapters in PEFT's format (loadable by peft.PeftModel.from_pretrained)."""
    modules = lora_modules(model)
    if not modules:
        raise ValueError("save_adapter: the model has no LoRA modules (call apply_lora first)")
    tensors = {}
    for path, m in modules.items():
        tensors[f"{PREFIX}{path}.lora_A.weight"] = m.lora_A.weight.detach().contiguous()
        tensors[f"{PREFIX}{path}.lora_B.weight"] = m.lora_B.weight.detach().contiguous()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
    (directory / CONFIG_NAME).write_text(json.dumps(_config(model, modules), indent=2) + "\n")


class AdapterError(ValueError):
    """An adapter file that is malformed, does not fit the model, or uses a PEFT feature
    pyengine cannot apply exactly."""


# PEFT LoraConfig options that change what an adapter computes beyond W + s * B @ A:
# refused (when set) rather than silently dropped.
UNSUPPORTED_OPTIONS = {
    "use_dora": "DoRA (weight-decomposed LoRA)", "use_qalora": "QALoRA",
    "lora_bias": "a bias on lora_B (lora_bias)", "fan_in_fan_out": "fan_in_fan_out (Conv1D layout)",
    "layer_replication": "layer replication", "trainable_token_indices": "trainable tokens",
    "target_parameters": "LoRA on nn.Parameter (target_parameters)",
    "alora_invocation_tokens": "activated LoRA (aLoRA)", "arrow_config": "Arrow routing",
    "use_bdlora": "block-diagonal LoRA", "kasa_config": "KaSA", "velora_config": "VeLoRA",
    "monteclora_config": "MonteCLoRA",
}


def _pattern_value(path: str, pattern: dict | None, default):
    """PEFT's rank_pattern / alpha_pattern rule: the first key (a regex) that matches the
    end of the module path after a "." (or the whole path) gives the value."""
    for key, value in (pattern or {}).items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default


@dataclass
class Adapter:
    """A PEFT LoRA adapter directory, read and checked by read_adapter: the only reader of
    adapter files (load_adapter, pyengine.infer and pyengine.export all use it)."""
    directory: Path
    lora: dict[str, tuple[torch.Tensor, torch.Tensor]]  # module path -> (A [r, in], B [out, r])
    ranks: dict[str, int]
    alphas: dict[str, float]
    rslora: bool
    dropout: float
    extra: dict[str, torch.Tensor]  # full tensors that replace a model parameter (by its path)
    keys: dict[str, str]  # module or parameter path -> its key in the file, for messages

    @property
    def weights_file(self) -> Path:
        return self.directory / WEIGHTS_NAME

    def scaling(self, path: str) -> float:
        return lora_scaling(self.ranks[path], self.alphas[path], self.rslora)

    def delta(self, path: str) -> torch.Tensor:
        """fp32 scaling * B @ A of the module at `path` (what merging adds to its weight)."""
        a, b = self.lora[path]
        return self.scaling(path) * (b.float() @ a.float())


def _check_options(cfg: dict, cfg_file: Path) -> None:
    if cfg.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{cfg_file}: peft_type {cfg.get('peft_type')!r} is not supported (only LORA)")
    for key, feature in UNSUPPORTED_OPTIONS.items():
        if cfg.get(key):
            raise AdapterError(f"{cfg_file}: {feature} is not supported ({key}={cfg[key]!r}); "
                               "pyengine applies plain LoRA only")
    if cfg.get("bias", "none") != "none":
        raise AdapterError(f"{cfg_file}: trained biases are not supported (bias={cfg['bias']!r}; "
                           "only 'none')")
    for key in ("r", "lora_alpha"):
        if not isinstance(cfg.get(key), (int, float)) or isinstance(cfg.get(key), bool):
            raise AdapterError(f"{cfg_file}: {key} must be a number, got {cfg.get(key)!r}")


def read_adapter(directory: str | os.PathLike) -> Adapter:
    """Read a PEFT-format LoRA adapter (adapter_config.json + adapter_model.safetensors).
    Ranks and alphas per module follow PEFT's rank_pattern / alpha_pattern rule; PEFT's
    modules_to_save (and saved base layers) become full replacement tensors. Anything that
    is not plain LoRA on linear layers raises AdapterError naming the feature and the file."""
    directory = Path(directory)
    cfg_file, weights = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    for f in (cfg_file, weights):
        if not f.is_file():
            raise FileNotFoundError(f"adapter: {f} not found")
    try:
        cfg = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterError(f"{cfg_file}: not valid JSON ({e})") from e
    if not isinstance(cfg, dict):
        raise AdapterError(f"{cfg_file}: expected a JSON object, got {type(cfg).__name__}")
    _check_options(cfg, cfg_file)
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError, RuntimeError) as e:
        raise AdapterError(f"{weights}: cannot read safetensors ({e})") from e
    halves, extra, keys = {}, {}, {}
    for key, t in tensors.items():
        if not key.startswith(PREFIX):
            raise AdapterError(f"{weights}: key {key!r} does not start with {PREFIX!r}")
        name = key[len(PREFIX):]
        m = re.fullmatch(r"(.+)\.lora_([AB])(?:\.[^.]+)?\.weight", name)
        if m:
            halves.setdefault(m.group(1), {})[m.group(2)] = key
        elif ".lora_embedding_" in name:
            raise AdapterError(f"{weights}: LoRA on an embedding layer ({key}) is not supported")
        elif ".lora_" in name:
            raise AdapterError(f"{weights}: tensor {key!r} is not plain LoRA (only lora_A / lora_B "
                               "weights are supported)")
        else:  # modules_to_save copies and saved base layers replace the model's parameter
            path = re.sub(r"\.(modules_to_save(\.[^.]+)?|base_layer)\.", ".", name)
            extra[path], keys[path] = t, key
    if not tensors:
        raise AdapterError(f"{weights}: holds no tensors")
    lora, ranks, alphas = {}, {}, {}
    for path, ab in halves.items():
        for side in "AB":
            if side not in ab:
                raise AdapterError(f"{weights}: {PREFIX}{path}.lora_{side}.weight is missing (the "
                                   "file has only the other half of the adapter)")
        a, b = tensors[ab["A"]], tensors[ab["B"]]
        r = _pattern_value(path, cfg.get("rank_pattern"), cfg["r"])
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != r or b.shape[1] != r:
            raise AdapterError(f"{weights}: {ab['A']} {list(a.shape)} and {ab['B']} {list(b.shape)} "
                               f"are not a rank-{r} linear LoRA pair (r from {cfg_file})")
        lora[path], ranks[path], keys[path] = (a, b), r, ab["A"]
        alphas[path] = _pattern_value(path, cfg.get("alpha_pattern"), cfg["lora_alpha"])
    return Adapter(directory, lora, ranks, alphas, bool(cfg.get("use_rslora", False)),
                   float(cfg.get("lora_dropout") or 0.0), extra, keys)


def load_adapter(model: nn.Module, directory: str | os.PathLike,
                 backend: str | None = None, fuse_mlp: bool = True) -> nn.Module:
    """Load a PEFT-format LoRA adapter (made by save_adapter or by PEFT) into `model`.
    A model without LoRA modules gets them (rank / alpha from the config; fuse_mlp as in
    apply_lora); a model that has them must match the file exactly: every module, every shape.
    modules_to_save tensors (e.g. a classification head) replace the model's parameters."""
    adapter = read_adapter(directory)
    weights = adapter.weights_file
    modules = lora_modules(model)
    if not modules:
        paths = sorted(adapter.lora)
        for path in paths:
            _check_linear(model, path, f"{weights}: key {adapter.keys[path]!r} names module {path!r}")
        _adapt(model, paths, adapter.ranks, adapter.alphas, adapter.dropout, adapter.rslora,
               backend, fuse_mlp)
        modules = lora_modules(model)
    unexpected = sorted(set(adapter.lora) - set(modules))
    if unexpected:
        raise AdapterError(f"{weights}: adapter for {unexpected[0]!r} ({adapter.keys[unexpected[0]]}) "
                           f"but the model has no LoRA module there ({len(unexpected)} such modules)")
    missing = sorted(set(modules) - set(adapter.lora))
    if missing:
        raise AdapterError(f"{weights}: key {PREFIX}{missing[0]}.lora_A.weight is missing "
                           f"({len(missing)} LoRA modules of the model have no adapter in the file)")
    params = {}
    for path, m in modules.items():
        for side, t, param in zip("AB", adapter.lora[path], (m.lora_A.weight, m.lora_B.weight)):
            if t.shape != param.shape:
                raise AdapterError(
                    f"{weights}: {PREFIX}{path}.lora_{side}.weight has shape {list(t.shape)}, "
                    f"the model's {path}.lora_{side}.weight has {list(param.shape)} "
                    f"(rank {m.r}, in {m.in_features}, out {m.out_features})")
            params[param] = t
    own = dict(model.named_parameters(remove_duplicate=False))
    for name, t in adapter.extra.items():
        if name not in own or own[name].shape != t.shape:
            have = list(own[name].shape) if name in own else "no such parameter"
            raise AdapterError(f"{weights}: key {adapter.keys[name]!r} {list(t.shape)} does not fit "
                               f"the model ({name}: {have})")
        if sum(p is own[name] for p in own.values()) > 1:  # tied (lm_head = embed_tokens):
            parent, _, leaf = name.rpartition(".")        # PEFT trains a copy, so untie
            own[name] = nn.Parameter(own[name].detach().clone(), requires_grad=False)
            setattr(model.get_submodule(parent), leaf, own[name])
            if getattr(getattr(model, "config", None), "tie_word_embeddings", False):
                model.config.tie_word_embeddings = False
        params[own[name]] = t
    with torch.no_grad():
        for param, t in params.items():
            param.copy_(t)
    for name in adapter.extra:  # PEFT trains modules_to_save (not saved base layers)
        if ".base_layer." not in adapter.keys[name]:
            own[name].requires_grad_(True)
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (fp32 merge) and put plain nn.Linear back
    (fused MLPs become the model's own MLP modules again)."""
    _unfuse(model)
    for path, m in lora_modules(model).items():
        _replace(model, path, m.merged())
    return model


def _unfuse(model: nn.Module) -> None:
    """Fused MLPs back to the model's own MLP modules (holding the same LoRALinear)."""
    for path, m in list(model.named_modules()):
        if isinstance(m, LoRAMLP) and hasattr(m, "unfused_mlp"):
            _replace(model, path, m.unfused_mlp)
