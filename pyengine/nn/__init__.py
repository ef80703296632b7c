"""Modules over pyengine.ops."""
from pyengine.nn.attention import Attention, use_pyengine_attention
from pyengine.nn.lora import LoRALinear
from pyengine.nn.lora_mlp import LoRAMLP
from pyengine.nn.loss import FusedLinearCrossEntropyLoss
from pyengine.nn.norms import GemmaRMSNorm, LayerNorm, RMSNorm
from pyengine.nn.quant import QuantLinear

__all__ = ["Attention", "FusedLinearCrossEntropyLoss", "GemmaRMSNorm",
           "LayerNorm", "LoRALinear", "LoRAMLP",
           "QuantLinear", "RMSNorm", "use_pyengine_attention"]
