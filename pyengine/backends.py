"""Backend choice for every op: `backend=` argument > env PYENGINE_BACKEND > best available.

Backends: "ref" (plain PyTorch, always there), "cpu" (the C++ extension, CPU tensors),
"triton" (pyengine.kernels; GPU tensors, or CPU tensors under TRITON_INTERPRET=1).
An explicit request that cannot be met raises BackendUnavailable (a ValueError, so the
CLIs report it as a usage error); the automatic choice falls back with one debug log line.
Triton is only imported when a triton backend actually runs.
"""
from __future__ import annotations

import importlib.util
import logging
import os

import torch

from pyengine import _ext

log = logging.getLogger("pyengine")
BACKENDS = ("ref", "cpu", "triton")
_OPS: dict[str, tuple[str, ...]] = {}  # op name -> backends it implements
_logged: set[tuple[str, str]] = set()


class BackendUnavailable(ValueError):
    """A backend was requested (argument or PYENGINE_BACKEND) that cannot run here."""


def register_op(name: str, implemented: tuple[str, ...]) -> None:
    _OPS[name] = implemented


def _why_not(backend: str, device: torch.device | None) -> str | None:
    """None when `backend` can run on `device` (None = any device), else the reason."""
    if backend == "ref":
        return None
    if backend == "cpu":
        if _ext._C is None:
            return _ext.EXT_ERROR
        if device is not None and device.type != "cpu":
            return f"the cpu backend runs on CPU tensors, got {device.type}"
        return None
    if backend == "triton":
        if importlib.util.find_spec("triton") is None:
            return "triton is not installed"
        if os.environ.get("TRITON_INTERPRET") == "1":
            return None
        if device is None and not torch.cuda.is_available():
            return "no GPU (torch.cuda.is_available() is False; TRITON_INTERPRET=1 runs on CPU)"
        if device is not None and device.type == "cpu":
            return "triton needs a GPU tensor (or TRITON_INTERPRET=1 for CPU tensors)"
        return None
    return f"unknown backend '{backend}' (choose from {', '.join(BACKENDS)})"


def backends() -> dict[str, dict[str, str]]:
    """Per op, per backend: "available" or why not on this machine."""
    report = {}
    for op, implemented in sorted(_OPS.items()):
        report[op] = {}
        for b in BACKENDS:
            if b not in implemented:
                report[op][b] = "not implemented for this op"
            else:
                report[op][b] = _why_not(b, None) or "available"
    return report


def resolve(op: str, backend: str | None, device: torch.device) -> str:
    """The backend `op` runs with on `device`."""
    implemented = _OPS[op]
    requested = backend or os.environ.get("PYENGINE_BACKEND") or None
    if requested:
        where = "backend=" if backend else "PYENGINE_BACKEND="
        if requested not in implemented:
            raise BackendUnavailable(f"{op}: {where}{requested!r} is not implemented "
                                     f"(this op has: {', '.join(implemented)})")
        reason = _why_not(requested, device)
        if reason:
            raise BackendUnavailable(f"{op}: {where}{requested!r} requested but unavailable: "
                                     f"{reason}")
        return requested
    order = ("triton", "ref") if device.type != "cpu" else ("cpu", "ref")
    for b in order:
        if b in implemented and _why_not(b, device) is None:
            if b != order[0] and (op, b) not in _logged:
                _logged.add((op, b))
                log.debug("%s: falling back to '%s' (%s)", op, b, _why_not(order[0], device))
            return b
    return "ref"
