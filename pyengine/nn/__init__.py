"""Modules over pyengine.ops."""
from pyengine.nn.loss import FusedLinearCrossEntropyLoss
from pyengine.nn.quant import QuantLinear

__all__ = ["FusedLinearCrossEntropyLoss", "QuantLinear"]
