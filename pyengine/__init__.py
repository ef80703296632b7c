"""pyengine: fine-tuning and inference for transformer LMs on fused CPU/Triton kernels.

Import is light: the C++ extension loads if built; triton is never imported here.
"""
import os

# Before torch loads libgomp: idle OpenMP workers sleep instead of spinning.  On a shared
# or oversubscribed CPU, spinning made small training steps 5-15x slower (measured: MiniLM
# LoRA step 0.8 s passive vs 4-13 s active on this 2-core box under load).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from pyengine import lora, nn, ops  # noqa: E402
from pyengine.backends import backends

__version__ = "0.1.0"
__all__ = ["backends", "lora", "nn", "ops"]
