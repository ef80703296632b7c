"""A library has no side effects: importing any pyengine module leaves os.environ and
torch's global state exactly as they were (fresh interpreter, so nothing is cached), and
the backend report / explicit requests tell the truth about triton on a machine without
a GPU."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

import pyengine
from pyengine.backends import BackendUnavailable, resolve

MODULES = ["pyengine", "pyengine.ops", "pyengine.nn", "pyengine.lora", "pyengine.quant",
           "pyengine.data", "pyengine.models", "pyengine.finetune", "pyengine.finetune.trainer",
           "pyengine.finetune.__main__", "pyengine.infer", "pyengine.infer.__main__",
           "pyengine.export", "pyengine.cli", "pyengine.patching", "pyengine.peft_lora",
           "pyengine.predict", "pyengine.finetune.distributed", "pyengine.infer.batch"]
if importlib.util.find_spec("fastapi"):  # the `serve` extra
    MODULES += ["pyengine.serve", "pyengine.serve.app", "pyengine.serve.__main__"]

SNAPSHOT = """
import os, sys, json, torch
def state():
    return dict(
        env=dict(os.environ), threads=torch.get_num_threads(),
        interop=torch.get_num_interop_threads(), dtype=str(torch.get_default_dtype()),
        grad=torch.is_grad_enabled(), deterministic=torch.are_deterministic_algorithms_enabled(),
        matmul_precision=torch.get_float32_matmul_precision(),
        rng=torch.get_rng_state().sum().item(),
        anomaly=torch.is_anomaly_enabled(),
        autocast=torch.is_autocast_enabled("cpu"),
        mkldnn=torch.backends.mkldnn.enabled,
    )
before = state()
import importlib
for name in sys.argv[1:]:
    importlib.import_module(name)
after = state()
print(json.dumps(dict(before=before, after=after)))
"""


@pytest.mark.parametrize("module", MODULES)
def test_import_changes_no_environment_or_torch_global(module):
    out = subprocess.run([sys.executable, "-c", SNAPSHOT, module], capture_output=True,
                         text=True, env={k: v for k, v in os.environ.items()
                                         if k not in ("OMP_WAIT_POLICY", "HF_HUB_OFFLINE")})
    assert out.returncode == 0, out.stderr[-3000:]
    snap = json.loads(out.stdout.strip().splitlines()[-1])
    before, after = snap["before"], snap["after"]
    added = {k: after["env"][k] for k in after["env"].keys() - before["env"].keys()}
    changed = {k: (before["env"][k], after["env"][k]) for k in before["env"].keys()
               & after["env"].keys() if before["env"][k] != after["env"][k]}
    removed = sorted(before["env"].keys() - after["env"].keys())
    assert (added, changed, removed) == ({}, {}, []), f"import {module} changed os.environ"
    before.pop("env"), after.pop("env")
    assert after == before, f"import {module} changed torch global state"


def test_backends_report_triton_needs_a_gpu_or_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    report = pyengine.backends()["fused_linear_cross_entropy"]["triton"]
    if torch.cuda.is_available():
        assert report == "available"
    else:
        assert report != "available" and "GPU" in report


def test_requested_backend_that_cannot_run_is_a_clear_value_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("PYENGINE_BACKEND", "triton")
    with pytest.raises(BackendUnavailable, match=r"PYENGINE_BACKEND='triton'.*GPU"):
        resolve("fused_linear_cross_entropy", None, torch.device("cpu"))
    monkeypatch.setenv("PYENGINE_BACKEND", "cuda")
    with pytest.raises(ValueError, match=r"PYENGINE_BACKEND='cuda' is not implemented"):
        resolve("fused_linear_cross_entropy", None, torch.device("cpu"))
    monkeypatch.delenv("PYENGINE_BACKEND")
    with pytest.raises(BackendUnavailable, match=r"backend='triton'"):
        resolve("fused_linear_cross_entropy", "triton", torch.device("cpu"))
    assert resolve("fused_linear_cross_entropy", None, torch.device("cpu")) in ("cpu", "ref")


def test_passive_openmp_reexecutes_the_command_line_without_leaking(monkeypatch):
    """A CLI re-executes its own command line (interpreter flags kept) with
    OMP_WAIT_POLICY=PASSIVE unless the user chose a policy, leaving its os.environ as the
    user's; the re-executed process removes the policy before any work, so the programs it
    starts inherit the user's environment."""
    from pyengine.cli import PASSIVE_MARK, passive_openmp
    command = ["/usr/bin/python3", "-u", "-m", "pyengine.finetune", "--max-steps", "3"]
    monkeypatch.setattr(sys, "orig_argv", command)
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    user_env = dict(os.environ)
    calls = []
    monkeypatch.setattr(os, "execve", lambda *a: calls.append(a) or sys.exit(0))
    with pytest.raises(SystemExit):
        passive_openmp()
    assert calls == [(sys.executable, [sys.executable, *command[1:]],
                      dict(user_env, OMP_WAIT_POLICY="PASSIVE", **{PASSIVE_MARK: "1"}))]
    assert dict(os.environ) == user_env
    monkeypatch.setattr(os, "environ", dict(calls[0][2]))  # the re-executed process
    passive_openmp()
    assert os.environ == user_env and len(calls) == 1
    monkeypatch.setattr(os, "environ", dict(user_env, OMP_WAIT_POLICY="ACTIVE"))
    passive_openmp()  # a policy the user chose: kept, no re-execution
    assert len(calls) == 1 and os.environ["OMP_WAIT_POLICY"] == "ACTIVE"


CHILD_ENV = """
import os, subprocess, sys
import pyengine.cli
pyengine.cli.passive_openmp()
child = subprocess.run([sys.executable, "-c", "import os; print(os.environ.get('OMP_WAIT_POLICY'))"],
                       capture_output=True, text=True).stdout.strip()
print(os.environ.get("OMP_WAIT_POLICY"), child, sys.orig_argv[1])
"""


def test_passive_openmp_for_real(tmp_path):
    """The real re-execution: the work runs once, with the interpreter's flags, and the
    policy reaches neither os.environ nor a child."""
    script = tmp_path / "cli.py"
    script.write_text(CHILD_ENV)
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-u", str(script)], capture_output=True, text=True,
                         env=env, timeout=120)
    assert (out.returncode, out.stdout) == (0, "None None -u\n"), out.stderr[-2000:]
