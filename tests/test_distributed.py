"""Data-parallel fine-tuning: `python -m torch.distributed.run --nproc_per_node 2 -m
pyengine.finetune` (gloo, 2 CPU processes) against the single-process run with grad_accum x 2
on tiny Llama / BERT directories."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from pyengine.finetune import run
from pyengine.finetune import trainer as T
from tests.test_finetune import causal, cls_data, metrics_of, text_data  # noqa: F401

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_cmd(cfg: dict, tmp: Path, *flags: str) -> list[str]:
    """torchrun with 2 ranks on this machine, the config as a YAML file plus flags."""
    path = tmp / f"config-{len(list(tmp.glob('config-*')))}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
            "--master_port", str(free_port()), "-m", "pyengine.finetune", "--config", str(path),
            *flags]


def env():
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))


def torchrun(cfg: dict, tmp: Path, *flags: str, timeout=240) -> subprocess.CompletedProcess:
    return subprocess.run(torchrun_cmd(cfg, tmp, *flags), cwd=ROOT, env=env(), timeout=timeout,
                          capture_output=True, text=True)


def files(out: Path) -> list[str]:
    return sorted(str(p.relative_to(out)) for p in out.rglob("*"))


def assert_same_training(one: Path, two: Path, weights: str):
    """The 2-rank run's weights and metrics.jsonl equal the 1-process run's (fp32 noise)."""
    a, b = load_file(one / weights), load_file(two / weights)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-6, msg=k)
    ma, mb = metrics_of(one), metrics_of(two)
    assert [(m["step"], m["epoch"], m["tokens"], m["lr"]) for m in ma] == \
        [(m["step"], m["epoch"], m["tokens"], m["lr"]) for m in mb]
    for x, y in zip(ma, mb):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-5)
        assert y["grad_norm"] == pytest.approx(x["grad_norm"], rel=1e-4)


LORA = dict(max_steps=6, log_every=2, save_every=2, eval_data=None)


@pytest.fixture(scope="module")
def two_ranks(llama, text_data, tmp_path_factory):
    """The uninterrupted 2-rank LoRA run (grad_accum 1 per rank)."""
    tmp = tmp_path_factory.mktemp("two")
    r = torchrun(causal(llama, text_data, tmp / "out", **LORA), tmp)
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("done: 6 steps") == 1, r.stderr  # rank 0 reports, rank 1 is quiet
    return tmp / "out"


# 20 steps: a signal sent after step 2 lands in the middle of the run
DROPOUT = dict(LORA, lora_dropout=0.2, log_every=1, save_every=1, max_steps=20)


@pytest.fixture(scope="module")
def two_ranks_dropout(llama, text_data, tmp_path_factory):
    """An uninterrupted 2-rank run whose ranks draw dropout masks (seed + rank), a
    checkpoint each step (the last two are kept)."""
    tmp = tmp_path_factory.mktemp("dropout")
    r = torchrun(causal(llama, text_data, tmp / "out", **DROPOUT), tmp)
    assert r.returncode == 0, r.stderr
    return tmp / "out"


def test_lora_two_ranks_equal_one_process_with_grad_accum_2(llama, text_data, two_ranks, tmp_path):
    one = tmp_path / "one"
    run(causal(llama, text_data, one, grad_accum=2, **LORA))
    assert_same_training(one, two_ranks, "adapter_model.safetensors")
    # rank 0 alone wrote: the same files as the single-process run, no temp leftovers
    assert files(two_ranks) == files(one)
    assert [p.name for p in two_ranks.glob("checkpoint-*")] and not list(two_ranks.glob(".tmp*"))


def test_resume_under_torchrun_equals_the_uninterrupted_run(llama, text_data, two_ranks_dropout,
                                                           tmp_path):
    """The finished run back at its step-19 checkpoint, outputs gone: --resume under
    torchrun redoes step 20 into the same bytes (each rank's dropout RNG comes back from the
    checkpoint)."""
    out = tmp_path / "out"
    shutil.copytree(two_ranks_dropout, out)
    shutil.rmtree(out / "checkpoint-0000020")
    for name in ("adapter_model.safetensors", "metrics.jsonl"):
        (out / name).unlink()
    resumed = torchrun(causal(llama, text_data, out, resume=True, **DROPOUT), tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "at step 19" in resumed.stderr
    for name in ("adapter_model.safetensors", "metrics.jsonl"):
        assert (out / name).read_bytes() == (two_ranks_dropout / name).read_bytes(), name


def test_resume_with_another_world_size_is_refused(llama, text_data, two_ranks, tmp_path):
    """The global batch depends on the world size: a 2-rank checkpoint is not resumed by
    one process."""
    out = tmp_path / "out"
    shutil.copytree(two_ranks, out)
    with pytest.raises(ValueError, match=r"world_size 2 -> 1"):
        run(causal(llama, text_data, out, resume=True, **LORA))


@pytest.mark.slow  # > 30 s: two torchrun launches
def test_full_finetune_under_fsdp2_equals_one_process_and_resumes(llama, text_data, tmp_path):
    """FSDP2 (the fused CE sees the whole LM head inside the root's forward) trains what one
    process trains; its gathered checkpoint, loaded back into the shards, resumes exactly."""
    kw = dict(method="full", lr=1e-3, max_steps=4, log_every=2, save_every=2)
    one, two = tmp_path / "one", tmp_path / "two"
    run(causal(llama, text_data, one, grad_accum=2, **kw))
    r = torchrun(causal(llama, text_data, two, **kw), tmp_path)
    assert r.returncode == 0, r.stderr
    assert_same_training(one, two, "model.safetensors")
    assert files(two) == files(one)
    again = tmp_path / "again"
    shutil.copytree(two, again)
    shutil.rmtree(again / "checkpoint-0000004")
    for name in ("model.safetensors", "metrics.jsonl"):
        (again / name).unlink()
    r = torchrun(causal(llama, text_data, again, resume=True, **kw), tmp_path)
    assert r.returncode == 0, r.stderr
    for name in ("model.safetensors", "metrics.jsonl"):
        assert (again / name).read_bytes() == (two / name).read_bytes(), name


@pytest.fixture(scope="module")
def bert_no_dropout(bert, tmp_path_factory):
    """Each rank draws its own dropout masks (seed + rank): without dropout the runs compare."""
    path = tmp_path_factory.mktemp("bert") / "model"
    shutil.copytree(bert, path)
    config = json.loads((path / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (path / "config.json").write_text(json.dumps(config))
    return str(path)


def test_seq_cls_bert_two_ranks_equal_one_process(bert_no_dropout, cls_data, tmp_path):
    kw = dict(model=bert_no_dropout, data=cls_data[0], eval_data=cls_data[1], task="seq-cls",
              batch_size=8, epochs=1, log_every=2, lr=5e-3, dtype="fp32", progress=False,
              max_seq_len=48)
    run(dict(kw, output=str(tmp_path / "one"), grad_accum=2))
    r = torchrun(dict(kw, output=str(tmp_path / "two")), tmp_path)
    assert r.returncode == 0, r.stderr
    assert_same_training(tmp_path / "one", tmp_path / "two", "adapter_model.safetensors")
    assert files(tmp_path / "two") == files(tmp_path / "one")
    # 96 rows / 8 per micro-batch / 2 micro-batches per step (one per rank): 6 steps, 1 epoch
    assert metrics_of(tmp_path / "two")[-1]["step"] == 6
    assert metrics_of(tmp_path / "two")[-1]["epoch"] == 1.0


def test_bad_input_fails_with_exit_2_and_one_clear_error(llama, tmp_path):
    out = tmp_path / "out"
    r = torchrun(dict(model=llama, data=str(tmp_path / "missing.jsonl"), output=str(out)),
                 tmp_path, timeout=120)
    assert r.returncode != 0
    # Every rank checks its input, but torchrun SIGTERMs the others as soon as the first rank
    # exits, so one or both ranks get to print the (same) error line.
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert errors and set(errors) == {errors[0]} and "missing.jsonl" in errors[0], r.stderr
    assert "exitcode  : 2" in r.stderr and "Traceback" not in r.stderr.split("error: ")[0]
    assert not out.exists()


def rank_pids(launcher: subprocess.Popen) -> list[int]:
    """The ranks: the torchrun process's children (Linux /proc)."""
    tasks = Path(f"/proc/{launcher.pid}/task")
    return [int(c) for t in tasks.iterdir() for c in (t / "children").read_text().split()]


def wait_for_step(out: Path, step: int, launcher: subprocess.Popen, timeout=180):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        assert launcher.poll() is None, launcher.communicate()
        if (out / "metrics.jsonl").is_file() and any(
                m["step"] >= step for m in metrics_of(out)):
            return
        time.sleep(0.05)
    raise TimeoutError(f"no step {step} in {out / 'metrics.jsonl'}")


@pytest.mark.slow  # > 30 s: two torchrun launches
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_stopped_rank_then_resume_equals_the_uninterrupted_run(llama, text_data,
                                                               two_ranks_dropout, tmp_path, sig):
    """SIGTERM to one rank: both stop at the same step boundary, rank 0 checkpoints, then
    they exit.  SIGKILL: torchrun tears the group down; the last complete checkpoint
    is resumed.  Either way the resumed run equals the uninterrupted one."""
    out = tmp_path / "out"
    cfg = causal(llama, text_data, out, **DROPOUT)
    launcher = subprocess.Popen(torchrun_cmd(cfg, tmp_path), cwd=ROOT, env=env(),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_step(out, 2, launcher)
        os.kill(rank_pids(launcher)[1], sig)
        _, err = launcher.communicate(timeout=120)
    finally:
        launcher.kill()
    assert launcher.returncode != 0
    if sig == signal.SIGTERM:
        # rank 1 exits 128 + SIGTERM after the checkpoint; rank 0 too, unless torchrun, seeing
        # rank 1 gone, terminates it first (-15)
        codes = re.findall(r"exitcode\s*: (-?\d+)", err)
        assert "143" in codes and set(codes) <= {"143", "-15"}, err
        assert T.latest_checkpoint(out).name == f"checkpoint-{metrics_of(out)[-1]['step']:07d}"
    assert T.latest_checkpoint(out) is not None
    resumed = torchrun(causal(llama, text_data, out, resume=True, **DROPOUT), tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    for name in ("adapter_model.safetensors", "metrics.jsonl"):
        assert (out / name).read_bytes() == (two_ranks_dropout / name).read_bytes(), name
    assert not list(out.glob(".tmp*"))


@pytest.mark.parametrize("world, message", [
    ("2", "started by torchrun .* but not in its process group"),
    ("two", "WORLD_SIZE='two' in the environment is not a positive integer")])
def test_run_outside_the_process_group_is_refused(llama, text_data, tmp_path, monkeypatch,
                                                 world, message):
    """A Run built by hand under torchrun's environment would train alone: refused before
    anything is written."""
    from pyengine.finetune import build_config
    monkeypatch.setenv("WORLD_SIZE", world)
    with pytest.raises(ValueError, match=message):
        T.Run(build_config(causal(llama, text_data, tmp_path / "out")))
    assert not (tmp_path / "out").exists()
