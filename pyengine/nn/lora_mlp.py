"""LoRAMLP: a Llama-family gated MLP with LoRA on gate, up and down, running as the single
autograd op pyengine.ops.lora_mlp (activation recomputed in backward, fused SwiGLU).

Parameter layout (PEFT's, minus the adapter name), so state-dict keys map one to one:

    gate_proj.base_layer.weight   [I, H]      frozen base (requires_grad False)
    gate_proj.lora_A.weight       [r, H]      trainable
    gate_proj.lora_B.weight       [I, r]      trainable
    up_proj.{base_layer,lora_A,lora_B}.weight     (same shapes as gate_proj)
    down_proj.{base_layer,lora_A,lora_B}.weight   [H, I], [r, I], [H, r]

In a PEFT adapter file the keys are `base_model.model.<path to mlp>.gate_proj.lora_A.weight`
etc.; in a PEFT model they carry the adapter name (`...gate_proj.lora_A.default.weight`).
Limits: no bias on the projections, no LoRA dropout (p = 0), SiLU activation only.
QLoRA: a LoRALinear projection with a quantized base (LoRALinear.quantize_base) runs
quantized inside the fused op.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from pyengine.nn.lora import LoRALinear
from pyengine.ops.lora_mlp import lora_mlp

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


class LoRAProjectionWeights(nn.Module):
    """Container for one projection's tensors (no forward: LoRAMLP runs all three in one
    op): `base_layer` (frozen nn.Linear, no bias), `lora_A` and `lora_B` (nn.Linear, no bias)."""

    def __init__(self, base_layer: nn.Linear, lora_a: nn.Linear, lora_b: nn.Linear):
        super().__init__()
        self.base_layer, self.lora_A, self.lora_B = base_layer, lora_a, lora_b
        self.base_layer.weight.requires_grad_(False)

    @classmethod
    def new(cls, base_layer: nn.Linear, r: int, dtype: torch.dtype) -> "LoRAProjectionWeights":
        """Fresh adapter for `base_layer` (shared, frozen): A like nn.Linear's default
        init, B zero, as PEFT does (the adapter starts as the identity update)."""
        if base_layer.bias is not None:
            raise ValueError("LoRAMLP: projections with a bias are not supported")
        dev = base_layer.weight.device
        lora_a = nn.Linear(base_layer.in_features, r, bias=False, device=dev, dtype=dtype)
        lora_b = nn.Linear(r, base_layer.out_features, bias=False, device=dev, dtype=dtype)
        nn.init.zeros_(lora_b.weight)
        return cls(base_layer, lora_a, lora_b)


def _is_silu(act) -> bool:
    return isinstance(act, nn.SiLU) or getattr(act, "__name__", "") == "silu" or \
        type(act).__name__ in ("SiLUActivation", "SiLU")


class LoRAMLP(nn.Module):
    """y = down(silu(gate(x)) * up(x)), each projection W + scale * B @ A (B @ A never formed)."""

    def __init__(self, gate_proj: LoRAProjectionWeights | LoRALinear,
                 up_proj: LoRAProjectionWeights | LoRALinear,
                 down_proj: LoRAProjectionWeights | LoRALinear, scale: float, backend: str | None = None,
                 recompute_projections: bool = False):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = gate_proj, up_proj, down_proj
        self.scale = float(scale)
        self.backend = backend
        self.recompute_projections = recompute_projections

    @staticmethod
    def lora_scale(r: int, alpha: float, rslora: bool = False) -> float:
        """alpha / r, or alpha / sqrt(r) with rsLoRA (PEFT's convention)."""
        return alpha / math.sqrt(r) if rslora else alpha / r

    @classmethod
    def from_mlp(cls, mlp: nn.Module, r: int, alpha: float, rslora: bool = False, *,
                 adapter_dtype: torch.dtype = torch.float32, backend: str | None = None,
                 recompute_projections: bool = False) -> "LoRAMLP":
        """Wrap a HF LlamaMLP-like module (gate_proj / up_proj / down_proj nn.Linear without
        bias, SiLU act_fn) with fresh adapters of rank r.  The base weights are shared with
        `mlp` (not copied) and frozen.  Adapters default to fp32 (PEFT's default for a bf16
        base, autocast_adapter_dtype=True)."""
        _check_mlp(mlp, "from_mlp")
        if not (isinstance(r, int) and r >= 1):
            raise ValueError(f"LoRAMLP.from_mlp: r must be a positive int, got {r!r}")
        projs = []
        for name in PROJECTIONS:
            lin = getattr(mlp, name)
            if not isinstance(lin, nn.Linear):
                raise TypeError(f"LoRAMLP.from_mlp: mlp.{name} must be nn.Linear, got "
                                f"{type(lin).__name__} (use from_lora_mlp for LoRA-wrapped "
                                "projections)")
            projs.append(LoRAProjectionWeights.new(lin, r, adapter_dtype))
        return cls(*projs, cls.lora_scale(r, alpha, rslora), backend, recompute_projections)

    @classmethod
    def from_lora_mlp(cls, mlp: nn.Module, adapter_name: str = "default", *,
                      backend: str | None = None,
                      recompute_projections: bool = False) -> "LoRAMLP":
        """Take over an MLP whose projections are already LoRA-wrapped, sharing (not
        copying) their parameters, so training either module trains both.  Accepted
        wrappers: PEFT's lora.Linear (lora_A / lora_B ModuleDicts keyed by adapter name,
        `scaling[adapter_name]`, dropout must be Identity), any module exposing
        `base_layer`, `lora_A`, `lora_B` (nn.Linear) and a float `scale` or `scaling`, and
        pyengine's LoRALinear (frozen `weight` of its own, no bias, dropout 0), which is kept
        as the projection itself so the state-dict keys do not change."""
        _check_mlp(mlp, "from_lora_mlp")
        projs, scales = [], []
        for name in PROJECTIONS:
            wrapped = getattr(mlp, name)
            lora_a, lora_b, scale = _lora_parts(wrapped, adapter_name, name)
            scales.append(scale)
            if isinstance(wrapped, LoRALinear):
                if wrapped.bias is not None or wrapped.dropout != 0:
                    raise ValueError(f"LoRAMLP.from_lora_mlp: {name} has a bias or LoRA "
                                     f"dropout {wrapped.dropout}; not supported")
                projs.append(wrapped)
                continue
            base = wrapped.base_layer
            if not isinstance(base, nn.Linear) or base.bias is not None:
                raise TypeError(f"LoRAMLP.from_lora_mlp: {name}.base_layer must be nn.Linear "
                                f"without bias, got {base}")
            projs.append(LoRAProjectionWeights(base, lora_a, lora_b))
        if len(set(scales)) != 1:
            raise ValueError(f"LoRAMLP.from_lora_mlp: gate/up/down scales differ {scales}; "
                             "one scale is required")
        return cls(*projs, scales[0], backend, recompute_projections)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tensors = []
        for p in (self.gate_proj, self.up_proj, self.down_proj):
            base = p.base_weight if isinstance(p, LoRALinear) else p.base_layer.weight
            tensors += [base, p.lora_A.weight, p.lora_B.weight]
        return lora_mlp(x, *tensors, self.scale, backend=self.backend,
                        recompute_projections=self.recompute_projections)

    def extra_repr(self) -> str:
        return (f"r={self.gate_proj.lora_A.out_features}, scale={self.scale}, "
                f"backend={self.backend!r}, recompute_projections={self.recompute_projections}")


def _check_mlp(mlp, where):
    for name in PROJECTIONS:
        if not hasattr(mlp, name):
            raise TypeError(f"LoRAMLP.{where}: {type(mlp).__name__} has no `{name}`")
    act = getattr(mlp, "act_fn", None)
    if act is not None and not _is_silu(act):
        raise ValueError(f"LoRAMLP.{where}: act_fn must be SiLU, got {act}")


def _lora_parts(wrapped, adapter_name, name):
    """(lora_A Linear, lora_B Linear, scale) of a LoRA-wrapped projection."""
    lora_a, lora_b = getattr(wrapped, "lora_A", None), getattr(wrapped, "lora_B", None)
    has_base = hasattr(wrapped, "base_layer") or isinstance(wrapped, LoRALinear)
    if lora_a is None or lora_b is None or not has_base:
        raise TypeError(f"LoRAMLP.from_lora_mlp: {name} ({type(wrapped).__name__}) is not "
                        "LoRA-wrapped (needs base_layer, lora_A, lora_B)")
    if isinstance(lora_a, nn.ModuleDict):  # PEFT: one entry per adapter name
        if adapter_name not in lora_a:
            raise KeyError(f"LoRAMLP.from_lora_mlp: {name} has no adapter '{adapter_name}' "
                           f"(has {list(lora_a.keys())})")
        dropout = wrapped.lora_dropout[adapter_name]
        if not isinstance(dropout, nn.Identity):
            raise ValueError(f"LoRAMLP.from_lora_mlp: {name} uses LoRA dropout; not supported")
        return lora_a[adapter_name], lora_b[adapter_name], float(wrapped.scaling[adapter_name])
    scale = getattr(wrapped, "scale", getattr(wrapped, "scaling", None))
    if not isinstance(scale, (int, float)):
        raise TypeError(f"LoRAMLP.from_lora_mlp: {name} has no float `scale`/`scaling`")
    return lora_a, lora_b, float(scale)
