"""Access to the C++ extension pyengine._C: whether it is built, and small helpers the op
files share (dtype codes, data pointers, thread count).  The extension is optional: when
it is missing every op runs on the reference backend."""
from __future__ import annotations

import torch

try:
    from pyengine import _C  # noqa: F401
    EXT_ERROR = None
except ImportError as e:  # not built (PYENGINE_NO_EXT=1) or broken build
    _C = None
    EXT_ERROR = f"extension pyengine._C not importable ({e})"

DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2, torch.float64: 3}


def dtype_code(t: torch.Tensor) -> int:
    return DTYPE_CODES[t.dtype]


def ptr(t: torch.Tensor | None) -> int:
    """Data pointer for the extension (0 for None)."""
    return 0 if t is None else t.data_ptr()


def num_threads() -> int:
    """Kernels use as many threads as torch does, so we never oversubscribe."""
    return torch.get_num_threads()
