"""QuantLinear: an nn.Linear replacement whose frozen weight is a QuantizedWeight.

The quantized planes are buffers ("qs", "scales"), so state_dict / .to() carry them (the
fp16 scales are part of the format: `.to(dtype)` moves them, never casts them); the format
and shape are plain attributes.  forward = pyengine.ops.quant_matmul.
InferenceQuantLinear: the same module whose forward calls the backend chosen at
construction directly (pyengine.infer: no per-call checks, dispatch or autograd).
"""
from __future__ import annotations

import torch
from torch import Tensor

from pyengine.backends import resolve
from pyengine.ops import quant as quant_ops
from pyengine.ops.quant import quant_matmul
from pyengine.quant import QuantizedWeight, quantize


class QuantLinear(torch.nn.Module):
    def __init__(self, qweight: QuantizedWeight, bias: Tensor | None = None,
                 backend: str | None = None):
        super().__init__()
        self.fmt = qweight.fmt
        self.out_features, self.in_features = qweight.shape
        self.backend = backend
        self.register_buffer("qs", qweight.qs)
        self.register_buffer("scales", qweight.scales)
        self.bias = None if bias is None else torch.nn.Parameter(bias.detach().clone(),
                                                                 requires_grad=False)

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear, fmt: str, backend: str | None = None):
        return cls(quantize(linear.weight, fmt), linear.bias, backend=backend)

    @property
    def qweight(self) -> QuantizedWeight:
        return QuantizedWeight(self.fmt, (self.out_features, self.in_features), self.qs,
                               self.scales)

    def forward(self, x: Tensor) -> Tensor:
        return quant_matmul(x, self.qweight, bias=self.bias, backend=self.backend)

    def _apply(self, fn, recurse=True):
        scales = self._buffers["scales"]
        super()._apply(fn, recurse)
        self._buffers["scales"] = scales.to(self._buffers["scales"].device)
        return self

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"fmt={self.fmt!r}, bias={self.bias is not None}")


class InferenceQuantLinear(QuantLinear):
    """QuantLinear for inference: forward(x [T, K]) calls the quant_matmul backend resolved
    at construction directly -- the public op's checks and dispatch cost microseconds per
    call, which add up at one token per forward.  No autograd."""

    def __init__(self, qweight: QuantizedWeight, bias: Tensor | None = None,
                 backend: str | None = None):
        super().__init__(qweight, bias, resolve(quant_ops.OP, backend, qweight.qs.device))
        self.kernel = quant_ops.BACKENDS[self.backend]

    def forward(self, x: Tensor) -> Tensor:
        buffers = self._buffers  # directly: Module.__getattr__ costs ~1 us a call
        return self.kernel(x.contiguous(), buffers["qs"], buffers["scales"], self.fmt, self.bias)
