"""Modules over pyengine.ops."""
from pyengine.nn.lora import LoRALinear
from pyengine.nn.lora_mlp import LoRAMLP
from pyengine.nn.loss import FusedLinearCrossEntropyLoss
from pyengine.nn.norms import LayerNorm, RMSNorm
from pyengine.nn.quant import QuantLinear

__all__ = ["FusedLinearCrossEntropyLoss", "LayerNorm", "LoRALinear", "LoRAMLP", "QuantLinear",
           "RMSNorm"]
