"""Shared benchmark plumbing: interleaved median timing (this machine is shared and noisy,
so implementations are timed round-robin in one process) and peak extra memory measured
in a fresh subprocess from VmHWM (tracemalloc is blind to torch; ru_maxrss is inherited)."""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from typing import Callable


def interleaved_times(fns: dict[str, Callable[[], object]], repeats: int = 3,
                      warmup: int = 1, clock=time.perf_counter) -> dict[str, list[float]]:
    """Seconds per call of each fn, timed round-robin so drift hits all equally.
    clock=time.thread_time gives CPU time of this thread (robust to other processes)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = clock()
            fn()
            times[name].append(clock() - t0)
    return times


def interleaved_medians(fns: dict[str, Callable[[], object]], repeats: int = 3,
                        warmup: int = 1, clock=time.perf_counter) -> dict[str, float]:
    return {name: statistics.median(ts)
            for name, ts in interleaved_times(fns, repeats, warmup, clock).items()}


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # kB in /proc
    raise RuntimeError(f"{field} not found in /proc/self/status")


def vm_hwm_bytes() -> int:
    """Peak resident set of this process so far."""
    return _status_bytes("VmHWM")


def vm_rss_bytes() -> int:
    return _status_bytes("VmRSS")


def reset_peak() -> None:
    """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to clear_refs)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_extra_in_subprocess(module: str, func: str, **kwargs) -> int:
    """Run `module.func(**kwargs)` in a fresh interpreter; it must build its inputs, call
    `reset_peak()`, run the op once and return nothing.  Returns peak RSS growth (bytes)
    over the RSS right after inputs were built (so: the op's extra memory + its outputs)."""
    code = (
        "import json, sys\n"
        f"from {module} import {func} as f\n"
        "from benchmarks.common import vm_hwm_bytes, vm_rss_bytes\n"
        "base = f(**json.loads(sys.argv[1]))\n"
        "print(json.dumps(vm_hwm_bytes() - base))\n"
    )
    out = subprocess.run([sys.executable, "-c", code, json.dumps(kwargs)], capture_output=True,
                         text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])
