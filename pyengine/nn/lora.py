"""LoRALinear: a frozen nn.Linear plus a trainable low-rank update (pyengine.ops.lora_linear).

Parameters keep the names a PEFT adapter file and the base checkpoint use: `weight` /
`bias` are the frozen base (so the base model's state-dict keys do not change), and
`lora_A.weight` [r, in] / `lora_B.weight` [out, r] the adapters.  Adapters are fp32 when
the base is bf16/fp16 (as PEFT's autocast_adapter_dtype does); init like PEFT: A
kaiming-uniform(a=sqrt(5)), B zeros, so a fresh adapter leaves the model unchanged.
QLoRA: `quantize_base(fmt)` replaces the `weight` parameter by the buffers `qs` / `scales`
of a QuantizedWeight (the forward then runs the base through quant_matmul).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from pyengine.ops.lora import lora_linear
from pyengine.quant import QuantizedWeight, quantize


def lora_scaling(r: int, alpha: float, rslora: bool) -> float:
    """alpha / r, or alpha / sqrt(r) with rank-stabilised LoRA."""
    return alpha / math.sqrt(r) if rslora else alpha / r


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, r: int = 16, alpha: float = 32, dropout: float = 0.0,
                 rslora: bool = False, backend: str | None = None):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"LoRALinear wraps nn.Linear, got {type(base).__name__}")
        if r < 1:
            raise ValueError(f"LoRALinear: rank r must be >= 1, got {r}")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r, self.alpha, self.dropout, self.rslora = r, alpha, dropout, rslora
        self.scaling = lora_scaling(r, alpha, rslora)
        self.backend = backend
        self.weight = nn.Parameter(base.weight.detach(), requires_grad=False)
        self.bias = (None if base.bias is None
                     else nn.Parameter(base.bias.detach(), requires_grad=False))
        dtype = base.weight.dtype
        adapter_dtype = torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype
        kw = dict(bias=False, device=base.weight.device, dtype=adapter_dtype)
        self.lora_A = nn.Linear(self.in_features, r, **kw)
        self.lora_B = nn.Linear(r, self.out_features, **kw)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.quant_fmt: str | None = None

    def quantize_base(self, fmt: str) -> None:
        """Replace the frozen base weight by its `fmt` quantization (q8_0 / q4_0 / nf4)."""
        if self.quant_fmt is not None:
            raise ValueError(f"LoRALinear: base is already quantized ({self.quant_fmt})")
        qweight = quantize(self.weight, fmt)
        del self.weight
        self.register_buffer("qs", qweight.qs)
        self.register_buffer("scales", qweight.scales)
        self.quant_fmt = fmt

    @property
    def base_weight(self) -> torch.Tensor | QuantizedWeight:
        if self.quant_fmt is None:
            return self.weight
        return QuantizedWeight(self.quant_fmt, (self.out_features, self.in_features), self.qs,
                               self.scales)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return lora_linear(x, self.base_weight, self.lora_A.weight, self.lora_B.weight, self.scaling,
                           bias=self.bias, dropout_p=self.dropout if self.training else 0.0,
                           backend=self.backend)

    def merged(self) -> nn.Linear:
        """A plain nn.Linear with W + scaling * B @ A (computed in fp32, stored in W's dtype;
        a quantized base merges into its dequantized fp32 weight)."""
        w = self.weight.detach() if self.quant_fmt is None else self.base_weight.dequantize()
        delta = self.scaling * (self.lora_B.weight.detach().float() @ self.lora_A.weight.detach().float())
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=w.device, dtype=w.dtype)
        with torch.no_grad():
            lin.weight.copy_((w.float() + delta).to(w.dtype))
            if self.bias is not None:
                lin.bias.copy_(self.bias.detach())
        return lin

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"alpha={self.alpha}, dropout={self.dropout}, rslora={self.rslora}"
                + ("" if self.quant_fmt is None else f", quant={self.quant_fmt!r}"))
