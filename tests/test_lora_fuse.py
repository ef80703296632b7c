"""apply_lora(fuse_mlp=True): Llama gated MLPs run as LoRAMLP (one fused op) with the same
parameters, logits, gradients and PEFT-format adapter files as the unfused LoRALinear path."""
import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from safetensors.torch import load_file  # noqa: E402

from pyengine.lora import (apply_lora, fused_mlps, load_adapter, lora_modules,  # noqa: E402
                           merge_lora, save_adapter)
from pyengine.nn import LoRALinear, LoRAMLP  # noqa: E402
from tests.test_lora_peft import ids, logits, randomize_adapters  # noqa: E402

ATOL = 1e-5
CONFIG = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("llama")
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIG)).save_pretrained(d)
    return d


def load(d):
    return transformers.LlamaForCausalLM.from_pretrained(d).eval()


def adapted(base_dir, fuse_mlp, **kw):
    model = apply_lora(load(base_dir), r=4, alpha=8, fuse_mlp=fuse_mlp, **kw)
    randomize_adapters(model)
    return model


def adapter_grads(model):
    model.train()
    model(input_ids=ids()).logits.square().mean().backward()
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def test_fused_equals_unfused_logits_grads_and_params(base_dir):
    fused, plain = adapted(base_dir, True), adapted(base_dir, False)
    assert len(fused_mlps(fused)) == 2 and not fused_mlps(plain)
    assert all(isinstance(layer.mlp, LoRAMLP) for layer in fused.model.layers)
    # same parameter names (base and adapters), same trainable count, same adapter modules
    assert list(fused.state_dict()) == list(plain.state_dict())
    assert fused.lora_trainable_params == plain.lora_trainable_params
    assert set(lora_modules(fused)) == set(lora_modules(plain))
    torch.testing.assert_close(logits(fused), logits(plain), atol=ATOL, rtol=0)
    want, got = adapter_grads(plain), adapter_grads(fused)
    assert got.keys() == want.keys() and all(g is not None for g in got.values())
    for n in want:
        torch.testing.assert_close(got[n], want[n], atol=ATOL, rtol=0, msg=n)


@pytest.mark.parametrize("kw", [dict(dropout=0.1), dict(target_modules=["gate_proj", "up_proj"])])
def test_what_cannot_fuse_stays_unfused(base_dir, kw):
    model = apply_lora(load(base_dir), r=4, alpha=8, **kw)
    assert not fused_mlps(model) and any(isinstance(m, LoRALinear) for m in model.modules())


def test_fused_adapter_file_loads_in_peft(base_dir, tmp_path):
    fused, plain = adapted(base_dir, True), adapted(base_dir, False)
    save_adapter(fused, tmp_path / "fused")
    save_adapter(plain, tmp_path / "plain")
    got = load_file(str(tmp_path / "fused" / "adapter_model.safetensors"))
    want = load_file(str(tmp_path / "plain" / "adapter_model.safetensors"))
    assert got.keys() == want.keys()
    assert "base_model.model.model.layers.0.mlp.gate_proj.lora_A.weight" in got
    assert all(torch.equal(got[k], want[k]) for k in want)
    theirs = peft.PeftModel.from_pretrained(load(base_dir), str(tmp_path / "fused")).eval()
    torch.testing.assert_close(logits(theirs), logits(fused), atol=1e-4, rtol=0)


def test_peft_adapter_loads_into_fused_model_and_merges(base_dir, tmp_path):
    config = peft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear")
    theirs_model = peft.get_peft_model(load(base_dir), config)
    randomize_adapters(theirs_model, seed=2)
    theirs_model.eval()
    theirs = logits(theirs_model)
    theirs_model.save_pretrained(str(tmp_path))
    # into a model already fused by apply_lora, and into a bare model (adapted on load)
    for model in (apply_lora(load(base_dir), r=8, alpha=16), load(base_dir)):
        model = load_adapter(model, tmp_path)
        assert len(fused_mlps(model)) == 2
        torch.testing.assert_close(logits(model), theirs, atol=1e-4, rtol=0)
        merged = merge_lora(model)
        assert not any(isinstance(m, (LoRALinear, LoRAMLP)) for m in merged.modules())
        mlp = merged.model.layers[0].mlp
        assert type(mlp).__name__ == "LlamaMLP" and isinstance(mlp.gate_proj, nn.Linear)
        torch.testing.assert_close(logits(merged), theirs, atol=1e-4, rtol=0)
