"""Public ops.  Each is a torch.library custom op (pyengine::<op>) with fake and autograd
registrations; `backend=` picks ref / cpu / triton (see pyengine.backends)."""
from pyengine.ops.cross_entropy import (fused_linear_cross_entropy,
                                        reference_linear_cross_entropy)
from pyengine.ops.lora import lora_linear, reference_lora_linear

__all__ = ["fused_linear_cross_entropy", "reference_linear_cross_entropy",
           "lora_linear", "reference_lora_linear"]
