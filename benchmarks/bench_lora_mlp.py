"""lora_mlp vs PEFT on a Llama MLP, fwd+bwd, measured side by side in one process.

Shape: hidden 576, intermediate 1536 (SmolLM-135M), 2048 tokens, r=16, alpha=32, dropout 0.
PEFT: peft.get_peft_model on a module holding a transformers LlamaMLP, target gate/up/down
(its defaults: fp32 adapters on a bf16 base).  Ours: LoRAMLP.from_lora_mlp on that same
PEFT-wrapped MLP, so both run on the very same parameters.
Memory: bytes autograd saves for backward (unique storages seen by saved_tensors_hooks),
not counting the parameters (base weights, adapters) both sides keep anyway.
Floor: 6 base GEMMs (3 forward, 3 for dx) = 12*N*H*I flops = 21.7 GFLOP, timed alone here.

    PYTHONPATH=. python -m pytest -q benchmarks/bench_lora_mlp.py   # gates (ratios)
    PYTHONPATH=. python benchmarks/bench_lora_mlp.py               # markdown table
"""
from __future__ import annotations

import statistics
import time

import pytest
import torch
from torch import nn

from pyengine.nn import LoRAMLP

N, HIDDEN, INTER, R, ALPHA = 2048, 576, 1536, 16, 32
ROUNDS, WARMUP = 7, 2
SPEEDUP_GATE, MEMORY_CUT_GATE = 1.3, 0.30


class Holder(nn.Module):
    def __init__(self, mlp):
        super().__init__()
        self.mlp = mlp

    def forward(self, x):
        return self.mlp(x)


def build(dtype):
    import peft
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=HIDDEN, intermediate_size=INTER, hidden_act="silu",
                      num_attention_heads=9, num_key_value_heads=3)
    model = peft.get_peft_model(Holder(LlamaMLP(cfg).to(dtype)), peft.LoraConfig(
        r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=["gate_proj", "up_proj",
                                                                 "down_proj"]))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(p, std=0.02)  # a trained adapter, not the zero init
    mlp = model.base_model.model.mlp
    return model, LoRAMLP.from_lora_mlp(mlp), LoRAMLP.from_lora_mlp(mlp, recompute_projections=True), mlp


def fwd_bwd(module, x, dy):
    module(x).backward(dy)


def base_gemms(mlp, x, dy):
    """The floor: the six frozen-base GEMMs alone (no LoRA, no activation)."""
    with torch.no_grad():
        g = x @ mlp.gate_proj.base_layer.weight.t()
        x @ mlp.up_proj.base_layer.weight.t()
        g @ mlp.down_proj.base_layer.weight.t()
        dh = dy @ mlp.down_proj.base_layer.weight
        dh @ mlp.gate_proj.base_layer.weight
        dh @ mlp.up_proj.base_layer.weight


def saved_activation_bytes(module, x, params):
    storages = {}

    def pack(t):
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = module(x)
    del y
    return sum(b for p, b in storages.items() if p not in params)


def measure(dtype):
    """Interleaved medians (seconds) and saved bytes for PEFT, ours, ours+recompute, floor."""
    peft_model, ours, ours_recompute, mlp = build(dtype)
    x = torch.randn(N, HIDDEN, dtype=dtype, requires_grad=True)
    dy = torch.randn(N, HIDDEN, dtype=dtype)
    runs = {"peft": lambda: fwd_bwd(peft_model, x, dy), "ours": lambda: fwd_bwd(ours, x, dy),
            "ours_recompute": lambda: fwd_bwd(ours_recompute, x, dy),
            "base_gemms": lambda: base_gemms(mlp, x, dy)}
    times = {k: [] for k in runs}
    for i in range(WARMUP + ROUNDS):
        for k, fn in runs.items():
            t = time.perf_counter()
            fn()
            if i >= WARMUP:
                times[k].append(time.perf_counter() - t)
    params = {p.untyped_storage().data_ptr() for p in peft_model.parameters()}
    saved = {k: saved_activation_bytes(m, x, params)
             for k, m in (("peft", peft_model), ("ours", ours), ("ours_recompute", ours_recompute))}
    return {k: statistics.median(v) for k, v in times.items()}, saved


_cache: dict = {}


def measured(dtype):
    if dtype not in _cache:
        _cache[dtype] = measure(dtype)
    return _cache[dtype]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_lora_mlp_vs_peft(benchmark, dtype):
    pytest.importorskip("peft")
    times, saved = measured(dtype)
    _, ours, _, _ = build(dtype)
    x = torch.randn(N, HIDDEN, dtype=dtype, requires_grad=True)
    dy = torch.randn(N, HIDDEN, dtype=dtype)
    benchmark.pedantic(fwd_bwd, args=(ours, x, dy), rounds=3, warmup_rounds=1)
    speedup = times["peft"] / times["ours"]
    memory_cut = 1 - saved["ours"] / saved["peft"]
    benchmark.extra_info.update(speedup_vs_peft=speedup, saved_bytes_cut_vs_peft=memory_cut,
                                **{f"{k}_ms": v * 1e3 for k, v in times.items()})
    assert speedup >= SPEEDUP_GATE, f"{dtype}: {speedup:.2f}x PEFT's speed < {SPEEDUP_GATE}x"
    assert memory_cut >= MEMORY_CUT_GATE, f"{dtype}: saved bytes cut {memory_cut:.0%}"


def main():
    print(f"N={N} H={HIDDEN} I={INTER} r={R} alpha={ALPHA}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}")
    print("| dtype | PEFT ms | ours ms | speed-up | ours+recompute ms | 6 base GEMMs ms | "
          "ours / GEMMs | saved MB PEFT | saved MB ours | cut | saved MB recompute |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for dtype in (torch.bfloat16, torch.float32):
        t, s = measure(dtype)
        mb = {k: v / 2 ** 20 for k, v in s.items()}
        print(f"| {str(dtype).split('.')[-1]} | {t['peft'] * 1e3:.1f} | {t['ours'] * 1e3:.1f} | "
              f"{t['peft'] / t['ours']:.2f}x | {t['ours_recompute'] * 1e3:.1f} | "
              f"{t['base_gemms'] * 1e3:.1f} | {t['ours'] / t['base_gemms']:.2f}x | "
              f"{mb['peft']:.1f} | {mb['ours']:.1f} | {1 - s['ours'] / s['peft']:.0%} | "
              f"{mb['ours_recompute']:.1f} |")


if __name__ == "__main__":
    main()
