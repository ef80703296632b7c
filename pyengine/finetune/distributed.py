"""Data-parallel fine-tuning under torchrun (torch.distributed, env:// rendezvous only).

`torchrun --nproc_per_node N -m pyengine.finetune ...` starts N ranks; each joins the
process group that torchrun's environment (WORLD_SIZE, RANK, MASTER_ADDR, ...) describes:
gloo for CPU training, NCCL for CUDA.  LoRA / QLoRA run under DistributedDataParallel over
the trainable parameters, `--method full` under FSDP2 (`fully_shard` per layer of every
nn.ModuleList, e.g. decoder / encoder layers, then the root).

Every forward goes through one root module, `_Call`, whose forward runs a function on the
model: the trainer's loss (decoder + fused CE on the LM-head weight) then runs inside the
root's forward, where FSDP2 has the root's parameters, the LM head included, unsharded, and
DDP has prepared its gradient reduction.

Gradients are SUMMED over ranks, never averaged: each rank's loss is its micro-batches'
sum-loss divided by the labelled count of the whole global window, so the sum is the
single-process gradient of that window (DDP: a sum comm hook; FSDP2: divide factor 1 with
plain sum reductions).
"""
from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as dist
from torch import nn


def launched() -> bool:
    """True when torchrun (or any env:// launcher) started this process as one of > 1 ranks."""
    world = os.environ.get("WORLD_SIZE", "1").strip() or "1"
    if not world.isdigit() or int(world) < 1:
        raise ValueError(f"WORLD_SIZE={world!r} in the environment is not a positive integer "
                         f"(it is set by torchrun)")
    return int(world) > 1


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


@contextlib.contextmanager
def session(device: torch.device = torch.device("cpu")):
    """Join torchrun's process group for the duration and leave it at the end, errors
    included; outside torchrun (or when the caller already joined) it does nothing."""
    if not launched() or dist.is_initialized():
        yield
        return
    dist.init_process_group(backend_for(device), init_method="env://")
    try:
        yield
    finally:
        dist.destroy_process_group()


class _Call(nn.Module):
    """The root module: forward(fn) = fn(model), so any loss or evaluation computed from the
    model runs inside the (DDP / FSDP2) root's forward."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, fn):
        return fn(self.model)


def _sum_hook(state, bucket):
    """DDP comm hook: all-reduce SUM (DDP's default divides by the world size)."""
    return dist.all_reduce(bucket.buffer(), async_op=True).get_future().then(
        lambda fut: fut.value()[0])


class Dist:
    """This process's rank in the run (world 1, rank 0 outside torchrun) and the collectives
    the trainer needs; every collective is a no-op in a single process."""

    def __init__(self):
        if launched() and not dist.is_initialized():
            raise ValueError("started by torchrun (WORLD_SIZE > 1) but not in its process group: "
                             "use pyengine.finetune.run() or python -m pyengine.finetune, which "
                             "join it")
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.is_main = self.rank == 0
        self.model = self.root = None
        self.fsdp = False

    def wrap(self, model: nn.Module, method: str):
        """DDP (lora) or FSDP2 (full) around the prepared model; plain calls in one process.
        Every rank built the same model from the same seed, so DDP skips its initial
        broadcast of the weights."""
        self.model = model
        if self.world == 1:
            return
        root = _Call(model)
        if method == "full":
            from torch.distributed.fsdp import FSDPModule, fully_shard
            for layers in [m for m in model.modules() if isinstance(m, nn.ModuleList)]:
                for layer in layers:
                    fully_shard(layer)
            fully_shard(root)
            for m in root.modules():
                if isinstance(m, FSDPModule):  # sums (gloo has no pre-multiplied sum)
                    m.set_gradient_divide_factor(1.0)
                    m.set_force_sum_reduction_for_comms(True)
            self.fsdp = True
        else:
            from torch.nn.parallel import DistributedDataParallel
            root = DistributedDataParallel(root, broadcast_buffers=False, init_sync=False)
            root.register_comm_hook(None, _sum_hook)
        self.root = root

    def call(self, fn):
        """fn(model), through the root's forward when wrapped."""
        return fn(self.model) if self.root is None else self.root(fn)

    def grad_sync(self, last: bool):
        """Reduce gradients only on the window's last micro-batch (DDP no_sync / FSDP2
        set_requires_gradient_sync)."""
        if self.fsdp:
            self.root.set_requires_gradient_sync(last)
        if self.root is None or last or self.fsdp:
            return contextlib.nullcontext()
        return self.root.no_sync()

    def sum(self, value: float) -> float:
        if self.world == 1:
            return value
        t = torch.tensor(value, dtype=torch.float64)
        dist.all_reduce(t)
        return float(t)

    def any(self, flag: bool) -> bool:
        """True on every rank when it is True on one (e.g. a stop request)."""
        return self.sum(float(flag)) > 0

    def gather(self, obj) -> list:
        """[obj of rank 0, obj of rank 1, ...] on every rank."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def barrier(self):
        if self.world > 1:
            dist.barrier()

    # ---------------------------------------------------------------- full states
    @staticmethod
    def value(t: torch.Tensor) -> torch.Tensor:
        """The whole tensor of a (possibly FSDP2-sharded) DTensor."""
        from torch.distributed.tensor import DTensor
        return t.full_tensor() if isinstance(t, DTensor) else t

    def trainable_state(self, params: list) -> dict:
        """{name: full copy} of the trainable parameters (FSDP2: gathered on every rank)."""
        return {n: self.value(p.detach()).clone() for n, p in params}

    def load_trainable(self, params: list, state: dict):
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                                 set_model_state_dict)
            set_model_state_dict(self.model, state, options=StateDictOptions(
                full_state_dict=True, strict=False))
            return
        named = dict(params)
        with torch.no_grad():
            for n, t in state.items():
                named[n].copy_(t)

    def optimizer_state(self, optimizer) -> dict:
        if not self.fsdp:
            return optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                             get_optimizer_state_dict)
        return get_optimizer_state_dict(self.model, optimizer, options=StateDictOptions(
            full_state_dict=True, cpu_offload=True))

    def load_optimizer(self, optimizer, state: dict):
        if not self.fsdp:
            optimizer.load_state_dict(state)
            return
        from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                             set_optimizer_state_dict)
        set_optimizer_state_dict(self.model, optimizer, state, options=StateDictOptions(
            full_state_dict=True))
