"""Modules over pyengine.ops."""
from pyengine.nn.loss import FusedLinearCrossEntropyLoss

__all__ = ["FusedLinearCrossEntropyLoss"]
