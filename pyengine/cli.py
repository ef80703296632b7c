"""What the command-line programs share: torch's OpenMP wait policy for the process, and
argparse types.

Between small ops, idle OpenMP threads spin and take the cores from pyengine's own kernel
thread pool (infer, 2 threads, 13M-parameter Llama on a shared machine: decode 25-57 ->
143-314 tokens/s fp32, 101-111 -> 394-696 q8_0; fine-tune steps were 5-15x slower under
load). The runtime reads OMP_WAIT_POLICY once, when torch loads, so a CLI re-executes
itself with PASSIVE set, and the re-executed process removes it again: programs the CLI
starts inherit the user's environment. Importing this module changes nothing."""
from __future__ import annotations

import argparse
import os
import sys

PASSIVE_MARK = "_PYENGINE_PASSIVE_OPENMP"


def passive_openmp() -> None:
    """Re-run this process's command line (interpreter flags included) with
    OMP_WAIT_POLICY=PASSIVE unless the user chose a policy; returns in the process that
    should do the work. Call it only from a CLI's `if __name__ == "__main__":` block."""
    if os.environ.pop(PASSIVE_MARK, None) is not None:
        os.environ.pop("OMP_WAIT_POLICY", None)
        return
    if "OMP_WAIT_POLICY" in os.environ:
        return
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", **{PASSIVE_MARK: "1"})
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value
