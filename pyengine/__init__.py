"""pyengine: fine-tuning and inference for transformer LMs on fused CPU/Triton kernels.

Import is light: the C++ extension loads if built; triton is never imported here.
"""
from pyengine import lora, nn, ops
from pyengine.backends import backends

__version__ = "0.1.0"
__all__ = ["backends", "lora", "nn", "ops"]
