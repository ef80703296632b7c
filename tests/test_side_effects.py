"""A library has no side effects: importing any pyengine module leaves os.environ and
torch's global state exactly as they were (fresh interpreter, so nothing is cached), and
the backend report / explicit requests tell the truth about triton on a machine without
a GPU."""
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
           "pyengine.export", "pyengine.cli"]

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


@pytest.mark.parametrize("module", ["pyengine.finetune", "pyengine.infer"])
def test_cli_runs_with_passive_openmp_without_leaking_it(module, monkeypatch):
    """Each CLI re-executes itself with OMP_WAIT_POLICY=PASSIVE (unless the user chose a
    policy) and leaves its own os.environ as the user's; the re-executed process removes
    the policy before any work, so the programs it starts inherit the user's environment."""
    import importlib

    from pyengine.cli import PASSIVE_MARK, passive_openmp
    main = importlib.import_module(module + ".__main__").main
    monkeypatch.setattr(sys, "argv", [module, "--help"])
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    user_env = dict(os.environ)
    calls = []
    monkeypatch.setattr(os, "execve", lambda *a: calls.append(a) or sys.exit(0))
    with pytest.raises(SystemExit):
        main()
    assert calls == [(sys.executable, [sys.executable, "-m", module, "--help"],
                      dict(user_env, OMP_WAIT_POLICY="PASSIVE", **{PASSIVE_MARK: "1"}))]
    assert dict(os.environ) == user_env
    monkeypatch.setattr(os, "environ", dict(calls[0][2]))  # the re-executed process
    passive_openmp(module)
    assert os.environ == user_env and len(calls) == 1
    monkeypatch.setattr(os, "environ", dict(user_env, OMP_WAIT_POLICY="ACTIVE"))
    passive_openmp(module)  # a policy the user chose: kept, no re-execution
    assert len(calls) == 1 and os.environ["OMP_WAIT_POLICY"] == "ACTIVE"
