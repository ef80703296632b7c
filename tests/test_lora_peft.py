"""pyengine.lora on tiny Hugging Face models (Llama, Qwen2, Mistral, BERT) built from config
and loaded from a saved directory: adapters move both ways between pyengine and PEFT with
equal logits; merge == base + adapter; clear errors for adapters that do not fit."""
import json

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from safetensors.torch import load_file, save_file  # noqa: E402

from pyengine.lora import (AdapterError, apply_lora, fused_mlps, load_adapter, lora_modules,  # noqa: E402
                           merge_lora, save_adapter)
from pyengine.nn import LoRALinear  # noqa: E402

ATOL = 1e-4
DECODER = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
CONFIGS = {
    "llama": lambda: (transformers.LlamaConfig(**DECODER), transformers.LlamaForCausalLM, None),
    "qwen2": lambda: (transformers.Qwen2Config(**DECODER), transformers.Qwen2ForCausalLM, None),
    "mistral": lambda: (transformers.MistralConfig(**DECODER), transformers.MistralForCausalLM, None),
    "bert": lambda: (transformers.BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2,
                                             num_attention_heads=4, intermediate_size=48,
                                             max_position_embeddings=64, num_labels=3),
                     transformers.BertForSequenceClassification, "SEQ_CLS"),
}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def base_dir(request, tmp_path_factory):
    config, cls, task = CONFIGS[request.param]()
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp(request.param)
    cls(config).save_pretrained(d)
    return d, cls, task


def load(base):
    d, cls, _ = base
    return cls.from_pretrained(d).eval()


def ids():
    return torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(3))


def logits(model):
    with torch.no_grad():
        return model(input_ids=ids()).logits


def randomize_adapters(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        # by name, so fused and unfused models of the same weights get the same adapters
        for _, p in sorted((n, p) for n, p in model.named_parameters() if p.requires_grad):
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def peft_targets(peft_model):
    return {n.removeprefix("base_model.model.") for n, m in peft_model.named_modules()
            if isinstance(m, peft.tuners.lora.LoraLayer)}


def test_apply_lora_freezes_all_but_adapters(base_dir):
    model = apply_lora(load(base_dir), r=4, alpha=8)
    mods = lora_modules(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.lora_{s}.weight" for n in mods for s in "AB"}
    assert model.lora_trainable_params == sum(4 * (m.in_features + m.out_features) for m in mods.values())
    assert not any(n.endswith(("lm_head", "classifier")) for n in mods)
    # a fresh adapter (B = 0) leaves the model unchanged (bit for bit unfused; the fused
    # MLP's C++ SwiGLU rounds differently from torch's silu); training reaches only adapters
    base = logits(load(base_dir))
    torch.testing.assert_close(logits(model), base, atol=1e-6, rtol=0)
    unfused = apply_lora(load(base_dir), r=4, alpha=8, fuse_mlp=False)
    torch.testing.assert_close(logits(unfused), base, atol=0, rtol=0)
    model.train()
    model(input_ids=ids()).logits.float().square().mean().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if n in trainable)
    assert all(p.grad is None for n, p in model.named_parameters() if n not in trainable)


def test_pyengine_adapter_loads_in_peft(base_dir, tmp_path):
    model = apply_lora(load(base_dir), r=4, alpha=8)
    randomize_adapters(model)
    ours = logits(model)
    save_adapter(model, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 8
    keys = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert all(k.startswith("base_model.model.") and k.endswith((".lora_A.weight", ".lora_B.weight"))
               for k in keys)
    theirs_model = peft.PeftModel.from_pretrained(load(base_dir), str(tmp_path)).eval()
    assert peft_targets(theirs_model) == set(lora_modules(model))
    torch.testing.assert_close(logits(theirs_model), ours, atol=ATOL, rtol=0)
    assert (ours - logits(load(base_dir))).abs().max() > 1e-2  # the adapter does something


@pytest.mark.parametrize("rslora", [False, True])
def test_peft_adapter_loads_in_pyengine(base_dir, tmp_path, rslora):
    task = base_dir[2]
    config = peft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", use_rslora=rslora,
                             task_type=task)
    theirs_model = peft.get_peft_model(load(base_dir), config)
    randomize_adapters(theirs_model, seed=2)
    theirs_model.eval()
    theirs = logits(theirs_model)
    theirs_model.save_pretrained(str(tmp_path))
    model = load_adapter(load(base_dir), tmp_path)
    assert set(lora_modules(model)) == peft_targets(theirs_model)
    torch.testing.assert_close(logits(model), theirs, atol=ATOL, rtol=0)
    # merged model == base + adapter, and only plain Linear layers remain
    merged = merge_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    torch.testing.assert_close(logits(merged), theirs, atol=ATOL, rtol=0)


def test_merge_equals_adapter_bf16_base(base_dir):
    """bf16 base: adapters are fp32 (as PEFT casts them); merging happens in fp32."""
    model = apply_lora(load(base_dir).to(torch.bfloat16), r=4, alpha=8)
    m = next(iter(lora_modules(model).values()))
    assert m.weight.dtype == torch.bfloat16 and m.lora_A.weight.dtype == torch.float32
    randomize_adapters(model)
    lin = m.merged()
    x = torch.randn(5, m.in_features).bfloat16()
    want = (x.float() @ (m.weight.float() + m.scaling * m.lora_B.weight @ m.lora_A.weight).T
            + (0 if m.bias is None else m.bias.float()))
    torch.testing.assert_close(lin(x).float(), want, atol=0.1, rtol=2e-2)


def _saved(model, tmp_path):
    save_adapter(model, tmp_path)
    return tmp_path / "adapter_model.safetensors"


def test_errors_for_adapters_that_do_not_fit(base_dir, tmp_path):
    src = apply_lora(load(base_dir), r=8, alpha=16)
    weights = _saved(src, tmp_path)
    first = next(iter(lora_modules(src)))  # checked first: model order
    key_a = f"base_model.model.{first}.lora_A.weight"
    # wrong rank: the message names the key and both shapes
    with pytest.raises(ValueError, match=rf"{key_a} has shape \[8, \d+\].*\[4, \d+\]"):
        load_adapter(apply_lora(load(base_dir), r=4, alpha=8), tmp_path)
    # a missing key
    tensors = load_file(str(weights))
    tensors.pop(key_a)
    save_file(tensors, str(weights))
    with pytest.raises(AdapterError, match=rf"{key_a} is missing"):
        load_adapter(load(base_dir), tmp_path)
    with pytest.raises(AdapterError, match=rf"{key_a} is missing"):
        load_adapter(apply_lora(load(base_dir), r=8, alpha=16), tmp_path)
    # an adapter for a module the model does not have
    tensors = load_file(str(_saved(src, tmp_path)))
    tensors["base_model.model.no.such.proj.lora_A.weight"] = torch.zeros(8, 4)
    tensors["base_model.model.no.such.proj.lora_B.weight"] = torch.zeros(4, 8)
    save_file(tensors, str(weights))
    with pytest.raises(AdapterError, match="no.such.proj"):
        load_adapter(load(base_dir), tmp_path)
    # an adapter whose input size does not match the layer
    tensors = load_file(str(_saved(src, tmp_path)))
    tensors[key_a] = torch.zeros(8, 3)
    save_file(tensors, str(weights))
    with pytest.raises(ValueError, match=rf"{key_a} has shape \[8, 3\]"):
        load_adapter(load(base_dir), tmp_path)


def test_target_modules_list_and_regex(base_dir):
    model = apply_lora(load(base_dir), r=2, alpha=4, target_modules=["query", "q_proj"])
    assert lora_modules(model) and all(n.endswith(("query", "q_proj")) for n in lora_modules(model))
    with pytest.raises(ValueError, match="no nn.Linear"):
        apply_lora(load(base_dir), target_modules=["nothing_like_this"])
    model = apply_lora(load(base_dir), r=2, alpha=4, target_modules=r".*\.0\..*")
    assert lora_modules(model) and all(".0." in n for n in lora_modules(model))
    assert isinstance(lora_modules(model)[next(iter(lora_modules(model)))].merged(), nn.Linear)


def _freeze_base_to(model, dtype):
    for p in model.parameters():
        if not p.requires_grad:
            p.data = p.data.to(dtype)
    return model


def _step(model, autocast):
    """Last hidden state (fp32), LoRA gradients by PEFT-file key and the hidden state's dtype of a forward +
    backward run inside torch.autocast bf16 (or plain), in eval mode (no dropout)."""
    model.eval()
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        res = model(input_ids=ids(), output_hidden_states=True)
    out = res.hidden_states[-1]  # more values than the logits: a steadier error measure
    (out.float().square().mean() + res.logits.float().square().mean()).backward()
    grads = {n.removeprefix("base_model.model.").replace(".default", ""): p.grad
             for n, p in model.named_parameters() if ".lora_" in n}
    return out.float(), grads, out.dtype


def _rel_err(got, want):
    return float((got.double() - want.double()).norm() / want.double().norm())


@pytest.mark.parametrize("base_dtype", [torch.float32, torch.bfloat16])
def test_autocast_bf16_matches_peft_under_the_same_autocast(base_dir, tmp_path, base_dtype):
    """apply_lora modules inside torch.autocast bf16 (fp32 model, or a bf16 frozen base with
    fp32 adapters as the trainer makes it): no forward pre-hooks needed, LoRA outputs in
    bf16 like F.linear's, fp32 adapter gradients; logits and gradients as close to the fp32
    computation (same bf16-rounded base) as PEFT's under the same autocast, within 2x."""
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                             task_type=base_dir[2])
    theirs_model = peft.get_peft_model(load(base_dir), config)
    randomize_adapters(theirs_model, seed=2)
    theirs_model.save_pretrained(str(tmp_path))
    exact_model = peft.PeftModel.from_pretrained(load(base_dir), str(tmp_path), is_trainable=True)
    with torch.no_grad():  # the reference: fp32 math on the bf16-rounded base
        for p in exact_model.parameters():
            if not p.requires_grad:
                p.copy_(p.to(base_dtype).float())
    model = _freeze_base_to(load_adapter(load(base_dir), tmp_path), base_dtype)
    _freeze_base_to(theirs_model, base_dtype)
    lora_out_dtypes = set()
    for m in [*lora_modules(model).values(), *fused_mlps(model)]:
        m.register_forward_hook(lambda mod, args, out: lora_out_dtypes.add(out.dtype))

    ours, our_grads, our_dtype = _step(model, autocast=True)
    theirs, their_grads, their_dtype = _step(theirs_model, autocast=True)
    exact, exact_grads, _ = _step(exact_model, autocast=False)
    assert lora_out_dtypes == {torch.bfloat16} and our_dtype == their_dtype
    assert set(our_grads) == set(exact_grads)
    assert all(g.dtype == torch.float32 for g in our_grads.values())
    assert _rel_err(ours, exact) <= 2 * _rel_err(theirs, exact)
    flat = {name: torch.cat([g[k].flatten() for k in sorted(exact_grads)])
            for name, g in (("ours", our_grads), ("theirs", their_grads), ("exact", exact_grads))}
    assert _rel_err(flat["ours"], flat["exact"]) <= 2 * _rel_err(flat["theirs"], flat["exact"])
