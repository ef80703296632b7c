"""pyengine: fine-tuning and inference for transformer LMs on fused CPU/Triton kernels.

Import is light: the C++ extension loads if built; triton is never imported here.
Importing changes no environment variable and no torch global state.
"""
from pyengine import lora, nn, ops
from pyengine.backends import BackendUnavailable, backends
from pyengine.patching import (AutoModelForCausalLM, AutoModelForSequenceClassification,
                               AutoModelForTokenClassification, patch, unpatch)

__version__ = "0.1.0"
__all__ = ["AutoModelForCausalLM", "AutoModelForSequenceClassification",
           "AutoModelForTokenClassification", "BackendUnavailable", "backends", "lora", "nn",
           "ops", "patch", "unpatch"]
