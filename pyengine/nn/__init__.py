"""Modules over pyengine.ops."""
from pyengine.nn.lora import LoRALinear
from pyengine.nn.loss import FusedLinearCrossEntropyLoss

__all__ = ["FusedLinearCrossEntropyLoss", "LoRALinear"]
