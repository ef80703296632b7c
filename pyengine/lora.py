"""LoRA on Hugging Face models, with adapters interchangeable with PEFT's.

    model = apply_lora(model, r=16, alpha=32, dropout=0.0, target_modules="all-linear")
    save_adapter(model, "out/")     # adapter_config.json + adapter_model.safetensors
    load_adapter(model, "peft_dir/")  # adapters made by PEFT load too
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
from pathlib import Path

import torch
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


def _select_targets(model: nn.Module, target_modules) -> list[str]:
    linear = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)
              and not isinstance(m, LoRALinear) and ".lora_" not in f".{name}"]
    if target_modules == "all-linear":
        heads = _output_head_names(model)
        return [n for n in linear if n not in heads]
    if isinstance(target_modules, str):  # a regex over the full module path, as in PEFT
        return [n for n in linear if re.fullmatch(target_modules, n)]
    names = list(target_modules)  # module names or path suffixes, as in PEFT
    return [n for n in linear if any(n == t or n.endswith("." + t) for t in names)]


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
    if not targets:
        raise ValueError("apply_lora: no nn.Linear module matches target_modules")
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
    target_modules: "all-linear", a list of module names / path suffixes, or a regex.
    quant: "nf4" | "q4_0" | "q8_0" quantizes the frozen bases (QLoRA, see quantize_base).
    fuse_mlp: run fully adapted Llama-family gated MLPs as one LoRAMLP op (not with quant:
    the fused op takes dense bases)."""
    targets = _select_targets(model, target_modules)
    _adapt(model, targets, dict.fromkeys(targets, r), dict.fromkeys(targets, alpha),
           dropout, rslora, backend, fuse_mlp and quant is None)
    return model if quant is None else quantize_base(model, quant)


def quantize_base(model: nn.Module, fmt: str) -> nn.Module:
    """QLoRA: quantize the frozen base weight of every LoRALinear to `fmt` (in place).
    Modules whose in_features is not a multiple of the format's block stay unquantized
    (logged)."""
    if fmt not in FORMATS:
        raise ValueError(f"quantize_base: unknown format {fmt!r} (one of {', '.join(FORMATS)})")
    block = format_spec(fmt).block
    _unfuse(model)  # the fused MLP op takes dense bases
    done = 0
    for path, m in lora_modules(model).items():
        if m.quant_fmt is not None:
            continue
        if m.in_features % block:
            log.info("quantize_base: %s left unquantized: in_features %d is not a multiple of "
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


def _pattern_value(path: str, pattern: dict, default):
    """PEFT's rank_pattern / alpha_pattern: keys match the end of the module path."""
    for key, value in (pattern or {}).items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default


def _read_adapter(directory: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    cfg_file, weights = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    for f in (cfg_file, weights):
        if not f.is_file():
            raise FileNotFoundError(f"load_adapter: {f} not found")
    cfg = json.loads(cfg_file.read_text())
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"load_adapter: {cfg_file}: peft_type {cfg.get('peft_type')!r} is not LORA")
    for key, ok in (("use_dora", False), ("fan_in_fan_out", False)):
        if cfg.get(key, ok) != ok:
            raise ValueError(f"load_adapter: {cfg_file}: {key}={cfg[key]} is not supported")
    if cfg.get("bias", "none") != "none":
        raise ValueError(f"load_adapter: {cfg_file}: bias={cfg['bias']!r} is not supported")
    return cfg, load_file(str(weights))


def _split_keys(tensors: dict, weights: Path):
    """{module path: {"A": key, "B": key}} for the LoRA tensors, and {param path: key}
    for the rest (PEFT's modules_to_save, e.g. a classification head)."""
    lora, extra = {}, {}
    for key in tensors:
        if not key.startswith(PREFIX):
            raise ValueError(f"load_adapter: {weights}: key {key!r} does not start with {PREFIX!r}")
        m = re.fullmatch(r"(.+)\.lora_([AB])(?:\.[^.]+)?\.weight", key[len(PREFIX):])
        if m:
            lora.setdefault(m.group(1), {})[m.group(2)] = key
        else:
            extra[key[len(PREFIX):]] = key
    return lora, extra


def load_adapter(model: nn.Module, directory: str | os.PathLike,
                 backend: str | None = None, fuse_mlp: bool = True) -> nn.Module:
    """Load a PEFT-format LoRA adapter (made by save_adapter or by PEFT) into `model`.
    A model without LoRA modules gets them (rank / alpha from the config; fuse_mlp as in
    apply_lora); a model that has them must match the file exactly: every module, every shape."""
    directory = Path(directory)
    cfg, tensors = _read_adapter(directory)
    weights = directory / WEIGHTS_NAME
    lora_keys, extra = _split_keys(tensors, weights)
    for path, ab in lora_keys.items():
        for side in "AB":
            if side not in ab:
                raise KeyError(f"load_adapter: {weights}: {PREFIX}{path}.lora_{side}.weight is "
                               "missing (the file has only the other half of the adapter)")
    modules = lora_modules(model)
    if not modules:
        paths = sorted(lora_keys)
        for path in paths:
            try:
                m = model.get_submodule(path)
            except AttributeError:
                m = None
            if not isinstance(m, nn.Linear):
                raise KeyError(f"load_adapter: {weights}: key {lora_keys[path]['A']!r} names "
                               f"module {path!r}, which is not an nn.Linear in this model")
        ranks = {p: _pattern_value(p, cfg.get("rank_pattern"), cfg["r"]) for p in paths}
        alphas = {p: _pattern_value(p, cfg.get("alpha_pattern"), cfg["lora_alpha"]) for p in paths}
        _adapt(model, paths, ranks, alphas, float(cfg.get("lora_dropout", 0.0)),
               bool(cfg.get("use_rslora", False)), backend, fuse_mlp)
        modules = lora_modules(model)
    unexpected = sorted(set(lora_keys) - set(modules))
    if unexpected:
        raise KeyError(f"load_adapter: {weights}: adapter for {unexpected[0]!r} "
                       f"({lora_keys[unexpected[0]]['A']}) but the model has no LoRA module there "
                       f"({len(unexpected)} such modules)")
    missing = sorted(set(modules) - set(lora_keys))
    if missing:
        raise KeyError(f"load_adapter: {weights}: key {PREFIX}{missing[0]}.lora_A.weight is "
                       f"missing ({len(missing)} LoRA modules of the model have no adapter in the file)")
    params = {}
    for path, m in modules.items():
        for side, param in (("A", m.lora_A.weight), ("B", m.lora_B.weight)):
            t = tensors[lora_keys[path][side]]
            if t.shape != param.shape:
                raise ValueError(
                    f"load_adapter: {weights}: {lora_keys[path][side]} has shape {list(t.shape)}, "
                    f"the model's {path}.lora_{side}.weight has {list(param.shape)} "
                    f"(rank {m.r}, in {m.in_features}, out {m.out_features})")
            params[param] = t
    own = dict(model.named_parameters())
    for path, key in extra.items():
        name = re.sub(r"\.modules_to_save(\.[^.]+)?\.", ".", path)
        if name not in own or own[name].shape != tensors[key].shape:
            have = list(own[name].shape) if name in own else "no such parameter"
            raise KeyError(f"load_adapter: {weights}: key {key!r} {list(tensors[key].shape)} does "
                           f"not fit the model ({name}: {have})")
        params[own[name]] = tensors[key]
    with torch.no_grad():
        for param, t in params.items():
            param.copy_(t)
    for path, key in extra.items():  # PEFT trains modules_to_save: keep them trainable
        own[re.sub(r"\.modules_to_save(\.[^.]+)?\.", ".", path)].requires_grad_(True)
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
