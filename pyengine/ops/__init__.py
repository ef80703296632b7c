"""Public ops.  Each is a torch.library custom op (pyengine::<op>) with fake and autograd
registrations; `backend=` picks ref / cpu / triton (see pyengine.backends)."""
from pyengine.ops.attention import attention, reference_attention
from pyengine.ops.cross_entropy import (fused_linear_cross_entropy,
                                        reference_linear_cross_entropy)
from pyengine.ops.lora import lora_linear, reference_lora_linear
from pyengine.ops.lora_gather import lora_gather, reference_lora_gather
from pyengine.ops.lora_mlp import lora_mlp, reference_lora_mlp
from pyengine.ops.norms import layer_norm, reference_layer_norm, reference_rms_norm, rms_norm
from pyengine.ops.quant import quant_matmul, reference_quant_matmul
from pyengine.ops.rope import reference_rope, rope
from pyengine.ops.swiglu import reference_swiglu, swiglu

__all__ = ["attention", "reference_attention", "fused_linear_cross_entropy", "reference_linear_cross_entropy",
           "lora_gather", "reference_lora_gather", "lora_linear", "reference_lora_linear",
           "lora_mlp", "reference_lora_mlp",
           "layer_norm", "reference_layer_norm", "rms_norm", "reference_rms_norm",
           "quant_matmul", "reference_quant_matmul", "reference_rope", "rope",
           "reference_swiglu", "swiglu"]
