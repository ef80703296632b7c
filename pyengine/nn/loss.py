"""Loss modules."""
from __future__ import annotations

import torch

from pyengine.ops.cross_entropy import fused_linear_cross_entropy


class FusedLinearCrossEntropyLoss(torch.nn.Module):
    """loss = module(hidden, weight, target, bias=None, num_items=None): the LM head
    projection and its cross-entropy in one op (logits never materialised).  filter_eps:
    opt-in gradient filtering (None = exact; see fused_linear_cross_entropy)."""

    def __init__(self, ignore_index: int = -100, label_smoothing: float = 0.0,
                 z_loss: float = 0.0, softcap: float | None = None, reduction: str = "mean",
                 backend: str | None = None, filter_eps: float | str | None = None):
        super().__init__()
        self.ignore_index, self.label_smoothing, self.z_loss = ignore_index, label_smoothing, z_loss
        self.softcap, self.reduction, self.backend = softcap, reduction, backend
        self.filter_eps = filter_eps

    def forward(self, hidden, weight, target, bias=None, num_items=None):
        return fused_linear_cross_entropy(
            hidden, weight, target, bias=bias, ignore_index=self.ignore_index,
            label_smoothing=self.label_smoothing, z_loss=self.z_loss, softcap=self.softcap,
            reduction=self.reduction, num_items=num_items, backend=self.backend,
            filter_eps=self.filter_eps)

    def extra_repr(self):
        return (f"ignore_index={self.ignore_index}, label_smoothing={self.label_smoothing}, "
                f"z_loss={self.z_loss}, softcap={self.softcap}, reduction={self.reduction!r}, "
                f"filter_eps={self.filter_eps!r}")
