"""PEFT LoRA models on pyengine's LoRA ops, with PEFT's modules, parameters and files kept.

    model = peft.get_peft_model(hf_model, peft.LoraConfig(...))
    patch_peft_lora(model)   # -> number of LoRA layers now running on pyengine's ops

Each peft.tuners.lora Linear layer in plain-LoRA use (see `_plain_adapter`: one active
adapter, not merged, no DoRA or other variant, no lora bias, dropout Identity or
nn.Dropout, an nn.Linear fp32/bf16 base) gets an instance-level forward that runs
pyengine.ops.lora_linear on the same Parameters: y = base(x) + scaling * B(A(dropout(x))),
the adapters' math in fp32 when they are fp32 (as PEFT's casting of x to the adapter dtype
does outside autocast; inside autocast PEFT's adapter matmuls run in the autocast dtype,
ours stay fp32).  Dropout draws the same keep-mask as nn.Dropout from torch's generator.
Llama / Mistral / Qwen2 gated MLPs whose three projections qualify (no bias, no active
dropout, one scale) run as one pyengine.ops.lora_mlp.

Every call re-checks PEFT's state (`disable_adapter()`, merge, set_adapter, hooks, extra
arguments such as `adapter_names`) and otherwise runs PEFT's own forward, so the result is
always PEFT's computation.  Nothing is registered or renamed: state_dict keys,
save_pretrained output and PEFT's classes are unchanged; the forwards are functions of this
module bound on the instances (`module.__dict__["forward"]`), so deleting that entry
undoes the patch.  Idempotent.  Other layer types (quantized bases, embeddings, Conv) are
left to PEFT.
"""
from __future__ import annotations

import logging
import sys

import torch
from torch import nn

from pyengine.ops.lora import lora_linear
from pyengine.nn.lora_mlp import PROJECTIONS
from pyengine.ops.lora_mlp import lora_mlp
from pyengine.patching import _is_silu, _kinds, _set_forward

log = logging.getLogger("pyengine")
BASE_DTYPES = (torch.float32, torch.bfloat16)  # lora_linear's x / base dtypes


def _hooked(*modules: nn.Module) -> bool:
    return any(m._forward_hooks or m._forward_pre_hooks for m in modules)


def _plain_adapter(layer, args=(), kwargs=None) -> str | None:
    """The adapter name when PEFT's forward of `layer` computes exactly
    base(x) + scaling * B(A(dropout(x))) for one adapter right now, else None."""
    if args or kwargs or layer.disable_adapters or layer.merged or layer.fan_in_fan_out \
            or not getattr(layer, "cast_input_dtype_enabled", True):
        return None
    active = layer.active_adapters
    if len(active) != 1 or active[0] not in layer.lora_A:
        return None
    name = active[0]
    base, lora_a, lora_b = layer.base_layer, layer.lora_A[name], layer.lora_B[name]
    if name in layer.lora_variant or layer.lora_bias.get(name) or lora_b.bias is not None \
            or type(layer.lora_dropout[name]) not in (nn.Identity, nn.Dropout) \
            or type(base) is not nn.Linear or _hooked(base, lora_a, lora_b):
        return None
    w, a = base.weight, lora_a.weight
    if w.dtype not in BASE_DTYPES or w.requires_grad or a.dtype != lora_b.weight.dtype \
            or a.dtype not in (torch.float32, w.dtype):
        return None
    return name


def _dropout_p(layer, name: str) -> float:
    drop = layer.lora_dropout[name]
    return drop.p if isinstance(drop, nn.Dropout) and drop.training else 0.0


def _lora_forward(self, x, *args, **kwargs):
    """PEFT's lora.Linear forward on pyengine.ops.lora_linear (PEFT's own when not plain)."""
    name = _plain_adapter(self, args, kwargs)
    if name is None:
        return type(self).forward(self, x, *args, **kwargs)
    base = self.base_layer
    return lora_linear(x, base.weight, self.lora_A[name].weight, self.lora_B[name].weight,
                       self.scaling[name], bias=base.bias, dropout_p=_dropout_p(self, name))


def _fusable(mlp) -> tuple[list[torch.Tensor], float] | None:
    """(the nine lora_mlp tensors, scale) when the three projections can run as one
    lora_mlp right now, else None."""
    tensors, scales = [], set()
    for proj in (getattr(mlp, n) for n in PROJECTIONS):
        name = _plain_adapter(proj) if proj.__dict__.get("forward") is not None else None
        if name is None or proj.base_layer.bias is not None or _dropout_p(proj, name) \
                or _hooked(proj):
            return None
        tensors += [proj.base_layer.weight, proj.lora_A[name].weight, proj.lora_B[name].weight]
        scales.add(float(proj.scaling[name]))
    if len(scales) != 1 or len({t.dtype for t in tensors[1::3] + tensors[2::3]}) != 1:
        return None
    return tensors, scales.pop()


def _mlp_forward(self, x):
    """The gated MLP as one pyengine.ops.lora_mlp (the model's own forward when not fusable)."""
    fused = _fusable(self)
    if fused is None:
        return type(self).forward(self, x)
    tensors, scale = fused
    return lora_mlp(x, *tensors, scale)


def patch_peft_lora(model: nn.Module) -> int:
    """Run the plain-LoRA peft.tuners.lora Linear layers of `model` (a PeftModel or the
    model inside it) on pyengine's ops, in place; returns how many layers now do.  Layers
    PEFT would compute differently right now (DoRA, merged, several active adapters, lora
    bias, quantized base, ...) keep PEFT's forward and are logged as skipped."""
    layer_mod = sys.modules.get("peft.tuners.lora.layer")
    if layer_mod is None:  # peft never imported: no PEFT layer can exist
        return 0
    patched, skipped = 0, []
    for path, m in model.named_modules():
        if not isinstance(m, layer_mod.LoraLayer):
            continue
        if type(m) is layer_mod.Linear and _plain_adapter(m) is not None \
                and _set_forward(m, _lora_forward):
            patched += 1
        else:
            skipped.append(path)
    fused, kinds = 0, _kinds()
    for m in model.modules():  # HF gated MLPs: down(act(gate(x)) * up(x)), act SiLU here
        if kinds.get(type(m), (None,))[0] == "MLP" and _is_silu(getattr(m, "act_fn", None)) \
                and all(type(getattr(m, n, None)) is layer_mod.Linear for n in PROJECTIONS) \
                and _fusable(m) is not None and _set_forward(m, _mlp_forward):
            fused += 1
    if skipped:
        log.info("patch_peft_lora: %d PEFT LoRA layers stay on PEFT's forward (e.g. %s)",
                 len(skipped), skipped[0])
    log.info("patch_peft_lora: %d LoRA layers on pyengine ops (%d gated MLPs fused)", patched,
             fused)
    return patched
