"""RMSNorm and LayerNorm modules over pyengine.ops.norms, with the residual add fused in.

Parameter names are those of the Hugging Face / torch modules they replace (`weight`,
`bias`), so state-dict keys do not change; `from_module` shares the original Parameters
(an optimizer or PEFT holding them keeps working).  A weight whose dtype differs from the
input's (e.g. norms kept in fp32 in a bf16 model) runs the reference math, which is the
replaced module's own mixed-dtype behaviour, bit for bit.
"""
from __future__ import annotations

import torch
from torch import nn

from pyengine.ops.norms import layer_norm, reference_layer_norm, reference_rms_norm, rms_norm


def _mixed(weight, x, residual) -> bool:
    dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
    return weight.dtype != dtype


class RMSNorm(nn.Module):
    """HF LlamaRMSNorm; forward(x) -> y, forward(x, residual) -> (y, x + residual)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6, backend: str | None = None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps
        self.backend = backend

    @classmethod
    def from_module(cls, module: nn.Module, backend: str | None = None) -> "RMSNorm":
        """The RMSNorm of a HF module with `weight` and `variance_epsilon` (or `eps`)."""
        eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
        new = cls(module.weight.shape[0], eps, backend)
        new.weight = module.weight
        return new

    def forward(self, x, residual=None):
        if _mixed(self.weight, x, residual):
            return reference_rms_norm(x, self.weight, self.variance_epsilon, residual)
        return rms_norm(x, self.weight, self.variance_epsilon, residual, backend=self.backend)

    def extra_repr(self):
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


class GemmaRMSNorm(nn.Module):
    """HF Gemma / Gemma2 RMSNorm: (x_fp32 * rstd * (1 + weight_fp32)) rounded once to x's
    dtype, as our rms_norm on fp32 rows with the effective weight 1 + weight (the gradient
    reaches `weight` through that add)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6, backend: str | None = None):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(hidden_size))
        self.eps = eps
        self.backend = backend

    @classmethod
    def from_module(cls, module: nn.Module, backend: str | None = None) -> "GemmaRMSNorm":
        """Ours for a HF Gemma RMSNorm (`weight`, `eps`), sharing its Parameter."""
        new = cls(module.weight.shape[0], module.eps, backend)
        new.weight = module.weight
        return new

    def forward(self, x):
        weight = 1.0 + self.weight.float()
        return rms_norm(x.float(), weight, self.eps, backend=self.backend).to(x.dtype)

    def extra_repr(self):
        return f"{tuple(self.weight.shape)}, eps={self.eps}"


class LayerNorm(nn.Module):
    """torch.nn.LayerNorm over the last dimension, with weight and bias;
    forward(x) -> y, forward(x, residual) -> (y, x + residual)."""

    def __init__(self, hidden_size: int, eps: float = 1e-5, backend: str | None = None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.bias = nn.Parameter(torch.zeros(hidden_size))
        self.eps = eps
        self.backend = backend

    @classmethod
    def from_module(cls, module: nn.LayerNorm, backend: str | None = None) -> "LayerNorm":
        """Ours for an nn.LayerNorm over one dimension with weight and bias."""
        if len(module.normalized_shape) != 1 or module.weight is None or module.bias is None:
            raise ValueError(f"LayerNorm.from_module: {module} must normalise one dimension "
                             f"and have a weight and a bias")
        new = cls(module.normalized_shape[0], module.eps, backend)
        new.weight, new.bias = module.weight, module.bias
        return new

    def forward(self, x, residual=None):
        if _mixed(self.weight, x, residual):
            return reference_layer_norm(x, self.weight, self.bias, self.eps, residual)
        return layer_norm(x, self.weight, self.bias, self.eps, residual, backend=self.backend)

    def extra_repr(self):
        return f"{tuple(self.weight.shape)}, eps={self.eps}"
