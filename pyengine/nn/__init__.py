"""Modules over pyengine.ops."""
from pyengine.nn.attention import Attention, use_pyengine_attention
from pyengine.nn.lora import LoRALinear
from pyengine.nn.lora_mlp import LoRAMLP
from pyengine.nn.loss import FusedLinearCrossEntropyLoss
from pyengine.nn.quant import QuantLinear

__all__ = ["Attention", "FusedLinearCrossEntropyLoss", "LoRALinear", "LoRAMLP", "QuantLinear",
           "use_pyengine_attention"]
