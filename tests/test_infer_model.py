"""pyengine.infer's decoder as an nn.Module tree: state_dict, .to(dtype), quantization by module
swap; the one HF <-> ours <-> GGUF weight-name table (pyengine.infer.weights); lazy loading
(peak memory of a bf16 load, in a fresh process)."""
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from pyengine.infer import LlamaDecoder, ModelLoadError, load_model
from pyengine.infer.weights import weight_names
from pyengine.nn.quant import InferenceQuantLinear, QuantLinear
from tests.tiny_llama import save_tiny_model

transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]
IDS = torch.tensor([0, 17, 5, 240, 33, 101, 7, 64, 12])


@pytest.fixture(scope="module")
def untied(tmp_path_factory):
    path = tmp_path_factory.mktemp("untied")
    save_tiny_model(path, seed=1, tie_word_embeddings=False)
    return path


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory):
    """Qwen2 with random (non-zero) q / k / v biases and an untied head."""
    path = tmp_path_factory.mktemp("qwen2")
    hf, _ = save_tiny_model(path, "Qwen2Config", seed=3, tie_word_embeddings=False, vocab_size=336,
                            intermediate_size=128)  # every in_features a multiple of nf4's 64
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("_proj.bias"):
                p.normal_(0, 0.5)
    hf.save_pretrained(path)
    return path


def run(model, ids=IDS):
    """Prefill of all but the last two ids, then two decode steps: logits [len(ids) - 2, V]."""
    model.reserve(len(ids))
    first = model.forward(ids[:-2], 0, all_logits=True)
    steps = [model.forward(ids[i:i + 1], i) for i in (len(ids) - 2, len(ids) - 1)]
    return torch.cat([first, torch.stack(steps)])


def test_state_dict_holds_every_weight_and_loads_into_another_model(untied, tmp_path):
    model = load_model(untied)
    sd = model.state_dict()
    assert set(sd) == {w.ours for w in weight_names(2) if not w.ours.endswith(".bias")}
    assert "kv_cache" not in sd and "rope" not in sd  # non-persistent buffers
    assert sd["layers.1.qkv.weight"].shape == (4 * 16 + 2 * 2 * 16, 64)
    save_tiny_model(tmp_path, seed=9, tie_word_embeddings=False)
    other = load_model(tmp_path)
    assert not torch.equal(run(other), run(model))
    other.load_state_dict(sd)
    assert torch.equal(run(other), run(model))


def test_tied_head_shares_the_embedding_parameter(tmp_path):
    save_tiny_model(tmp_path, seed=2)
    model = load_model(tmp_path)
    assert model.lm_head.weight is model.embed.weight
    bf16 = model.to(torch.bfloat16)
    assert bf16.lm_head.weight is bf16.embed.weight and bf16.embed.weight.dtype == torch.bfloat16


def test_to_bf16_is_loading_in_bf16(qwen2):
    """.to(bfloat16) casts the weights like dtype=bf16 at load (same bits); the RoPE table
    (complex64) and the KV cache (kv_dtype) keep their dtypes."""
    model = load_model(qwen2, max_len=16)
    run(model)
    model.to(torch.bfloat16)
    assert model.rope.dtype == torch.complex64 and model.kv_cache.dtype == torch.float32
    assert model.layers[0].qkv.bias.dtype == torch.bfloat16
    assert torch.equal(run(model), run(load_model(qwen2, dtype=torch.bfloat16, max_len=16)))
    back = model.to(torch.float32)
    assert back.embed.weight.dtype == torch.float32 and back.rope.dtype == torch.complex64


def test_quant_linear_to_dtype_keeps_its_fp16_scales():
    """The scales are part of the GGUF layout: .to(bf16) must not cast them."""
    lin = QuantLinear.from_linear(torch.nn.Linear(64, 8), "q8_0")
    scales = lin.scales.clone()
    x = torch.randn(3, 64)
    want = lin(x)
    lin.to(torch.bfloat16)
    assert lin.scales.dtype == torch.float16 and torch.equal(lin.scales, scales)
    assert lin.bias.dtype == torch.bfloat16
    torch.testing.assert_close(lin(x.bfloat16()).float(), want, rtol=0.02, atol=0.02)


@pytest.mark.parametrize("fmt", ["q8_0", "q4_0", "nf4"])
def test_quantize_swaps_every_linear_for_a_quant_linear(qwen2, fmt):
    """model.quantize(fmt) == load_model(quant=fmt) (quantized per tensor while loading) ==
    the public quant_matmul op on each weight (QuantLinear), bit for bit (the torch path, an
    fp32 KV cache everywhere; the C++ decode step has its own tests)."""
    def torch_path(model):
        model.c_step = False
        return model

    swapped = torch_path(load_model(qwen2))
    fp32 = run(swapped)  # the layers' cached steps must follow the swap
    swapped.quantize(fmt)
    assert not torch.equal(run(swapped), fp32)
    linears = {n: m for n, m in swapped.named_modules()
               if isinstance(m, (QuantLinear, torch.nn.Linear))}
    assert sorted(linears) == sorted(["lm_head"] + [f"layers.{i}.{p}" for i in range(2)
                                                    for p in ("qkv", "o", "gate_up", "down")])
    assert all(type(m) is InferenceQuantLinear and m.fmt == fmt for m in linears.values())
    assert linears["layers.0.qkv"].bias is not None  # Qwen2's q/k/v biases came along
    loaded = torch_path(LlamaDecoder.from_pretrained(qwen2, quant=fmt, kv_dtype=torch.float32))
    assert torch.equal(run(swapped), run(loaded))
    public = torch_path(load_model(qwen2))
    for name in linears:
        parent, _, child = name.rpartition(".")
        owner = public.get_submodule(parent) if parent else public
        setattr(owner, child, QuantLinear.from_linear(getattr(owner, child), fmt))
    assert torch.equal(run(public), run(loaded))
    other = torch_path(LlamaDecoder.from_pretrained(qwen2, quant=fmt, kv_dtype=torch.float32))
    with torch.no_grad():
        other.layers[0].qkv.scales.zero_()
    other.load_state_dict(loaded.state_dict())  # a quantized state_dict into a quantized model
    assert torch.equal(run(other), run(loaded))


def test_quantize_refuses_a_bf16_model(untied):
    with pytest.raises(ValueError, match="quantize: the model is torch.bfloat16"):
        load_model(untied, dtype=torch.bfloat16).quantize("q8_0")


# --------------------------------------------------------------------- the name table

@pytest.mark.parametrize("which", ["untied", "qwen2"])
def test_every_hf_name_maps_to_one_of_ours_and_one_gguf_name(request, tmp_path, which):
    gguf = pytest.importorskip("gguf")
    from pyengine.export import to_gguf

    path = request.getfixturevalue(which)
    hf_names = list(load_file(str(path / "model.safetensors")))
    table = {w.hf: w for w in weight_names(2)}
    assert len(table) == len(weight_names(2))  # no HF name twice
    ours = set(load_model(path).state_dict())
    reader = gguf.GGUFReader(to_gguf(path, tmp_path / "m.gguf", "f32"))
    gguf_names = [t.name for t in reader.tensors]
    for name in hf_names:
        assert table[name].ours in ours, name
    assert sorted(table[n].gguf for n in hf_names) == sorted(gguf_names)  # one each, all of them
    assert {table[n].ours for n in hf_names} == ours  # every one of ours comes from the checkpoint
    if which == "qwen2":
        assert {"blk.0.attn_q.bias", "blk.1.attn_v.bias"} <= set(gguf_names)


@pytest.mark.parametrize("extra", ["model.layers.0.mlp.extra_proj.weight",
                                   "model.layers.2.input_layernorm.weight",  # 2 layers only
                                   "model.visual.proj.weight"])
def test_an_unknown_checkpoint_tensor_is_an_error_naming_it(untied, tmp_path, extra):
    """A tensor no table row names would be dropped silently: refused, loader and export."""
    pytest.importorskip("gguf")
    from pyengine.export import to_gguf

    (tmp_path / "config.json").write_bytes((untied / "config.json").read_bytes())
    tensors = load_file(str(untied / "model.safetensors"))
    save_file({**tensors, extra: torch.zeros(4, 64)}, str(tmp_path / "model.safetensors"))
    msg = re.escape(f"{tmp_path / 'model.safetensors'}: tensor '{extra}' is not a weight of a "
                    "2-layer Llama-family decoder")
    with pytest.raises(ModelLoadError, match=msg):
        load_model(tmp_path)
    with pytest.raises(ModelLoadError, match=msg):
        to_gguf(tmp_path, tmp_path.parent / f"{tmp_path.name}.gguf", "f32")
    assert not (tmp_path.parent / f"{tmp_path.name}.gguf").exists()


def test_missing_and_misshapen_weights_are_errors(untied, tmp_path):
    (tmp_path / "config.json").write_bytes((untied / "config.json").read_bytes())
    tensors = load_file(str(untied / "model.safetensors"))
    name = "model.layers.1.self_attn.k_proj.weight"
    save_file({k: v for k, v in tensors.items() if k != name}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ModelLoadError, match=f"weight '{name}' missing from the checkpoint"):
        load_model(tmp_path)
    narrow = tensors[name][:, :48].contiguous()
    save_file({**tensors, name: narrow}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ModelLoadError, match=re.escape(
            f"weight '{name}' has shape [32, 48]; it is concatenated with "
            "'model.layers.1.self_attn.q_proj.weight' [64, 64], so its rows must be [64] long")):
        load_model(tmp_path)


def test_sharded_checkpoint_loads_like_one_file(untied, tmp_path):
    (tmp_path / "config.json").write_bytes((untied / "config.json").read_bytes())
    tensors = load_file(str(untied / "model.safetensors"))
    names = sorted(tensors)
    shards = {"a.safetensors": names[::2], "b.safetensors": names[1::2]}
    for f, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, str(tmp_path / f))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {k: f for f, keys in shards.items() for k in keys}}))
    assert torch.equal(run(load_model(tmp_path)), run(load_model(untied)))
    (tmp_path / "model.safetensors.index.json").write_text("{}")
    with pytest.raises(ModelLoadError, match="model.safetensors.index.json: corrupt index"):
        load_model(tmp_path)


def test_adapter_targeting_what_the_model_lacks_is_an_error(untied, tmp_path):
    """LoRA pairs for a module the model has not, or of the wrong width."""
    cfg = dict(peft_type="LORA", r=2, lora_alpha=4, target_modules=["q_proj"])
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    key = "base_model.model.model.layers.{}.self_attn.q_proj.lora_{}.weight"
    weights = tmp_path / "adapter_model.safetensors"
    save_file({key.format(5, "A"): torch.ones(2, 64), key.format(5, "B"): torch.ones(64, 2)},
              str(weights))
    with pytest.raises(ModelLoadError, match=re.escape(
            f"{weights}: {key.format(5, 'A')} targets model.layers.5.self_attn.q_proj.weight, "
            "which the model does not have")):
        load_model(untied, adapter=tmp_path)
    save_file({key.format(0, "A"): torch.ones(2, 48), key.format(0, "B"): torch.ones(64, 2)},
              str(weights))
    with pytest.raises(ModelLoadError, match=re.escape(
            "LoRA delta for model.layers.0.self_attn.q_proj.weight has shape [64, 48], the "
            "weight has [64, 64]")):
        load_model(untied, adapter=tmp_path)


# --------------------------------------------------------------------- lazy loading

PEAK = """
import os, sys, torch, transformers
from pyengine.infer import load_model
path = sys.argv[1]
transformers.AutoConfig.from_pretrained(path)  # imports happen before the baseline
def status(key):
    return int(next(l for l in open("/proc/self/status") if l.startswith(key)).split()[1]) * 1024
base = status("VmRSS:")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # VmHWM := VmRSS
model = load_model(path, dtype=torch.bfloat16, max_len=8)
print((status("VmHWM:") - base) / os.path.getsize(os.path.join(path, "model.safetensors")))
"""


def test_bf16_checkpoint_loads_in_bf16_without_copies_of_the_file(tmp_path):
    """A 36 MB bf16 checkpoint loaded as bf16: the process's peak grows by the model (1x the
    file) and one tensor, not by an fp32 copy of the file (the eager loader took ~3.6x)."""
    if not os.path.exists("/proc/self/clear_refs"):
        pytest.skip("needs Linux's /proc/self/clear_refs to reset the peak RSS")
    cfg = transformers.LlamaConfig(vocab_size=320, hidden_size=512, intermediate_size=1536,
                                   num_hidden_layers=6, num_attention_heads=8,
                                   num_key_value_heads=2)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16).save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").stat().st_size > 30e6
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-c", textwrap.dedent(PEAK), str(tmp_path)],
                         capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr
    assert float(res.stdout) < 1.3
