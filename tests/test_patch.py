"""pyengine.patch.patch_model on tiny HF models: patched vs unpatched logits and gradients
within torch's own error (vs an fp64 copy), with padding, fp32 and bf16, with and without
apply_lora; our ops actually run; state-dict keys, idempotence, other instances."""
import copy

import pytest
import torch
import transformers
from torch.utils._python_dispatch import TorchDispatchMode

from pyengine.lora import apply_lora
from pyengine.nn import LayerNorm, RMSNorm
from pyengine.patch import patch_model
from tests.conftest import assert_within_torch_error

DECODER_CONFIGS = {
    "llama": transformers.LlamaConfig,
    "mistral": transformers.MistralConfig,
    "qwen2": transformers.Qwen2Config,
}


def tiny_decoder(family, seed=0):
    cfg = DECODER_CONFIGS[family](vocab_size=61, hidden_size=32, intermediate_size=48,
                                  num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, max_position_embeddings=64,
                                  initializer_range=0.3, rms_norm_eps=1e-5,
                                  attn_implementation="sdpa")
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():  # non-trivial norm weights, so a dropped weight would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.5 * torch.randn_like(p))
    return model.eval()


def tiny_bert(seed=0):
    cfg = transformers.BertConfig(vocab_size=61, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=4, intermediate_size=48,
                                  max_position_embeddings=64, initializer_range=0.1,
                                  num_labels=3, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0)
    torch.manual_seed(seed)
    model = transformers.BertForSequenceClassification(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "LayerNorm" in name:
                p.copy_(0.5 * torch.randn_like(p) + (1 if name.endswith("weight") else 0))
    return model.eval()


def batch(seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, 61, (3, 9), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    mask[2, 6:] = 0  # right padding
    return ids, mask


def output_and_grads(model, ids, mask):
    """Logits and the gradients of every trainable parameter by name; the loss is a fixed
    random projection of the logits (of the unpadded tokens for a causal LM)."""
    model.zero_grad()
    logits = model(input_ids=ids, attention_mask=mask).logits
    proj = torch.randn(logits.shape, generator=torch.Generator().manual_seed(7),
                       dtype=torch.float64)
    if logits.dim() == 3:
        proj = proj * mask[..., None]
    (logits.double() * proj).sum().backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()
             if p.requires_grad}
    return logits.detach(), grads


class OpLog(TorchDispatchMode):
    """Names of the ops dispatched inside the block."""

    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def check_against_fp64(build, dtype, lora, ids, mask):
    base = build()
    if lora:
        apply_lora(base, r=4, alpha=8, target_modules=lora)
        with torch.no_grad():  # non-zero B so the adapters' gradients flow everywhere
            for n, p in base.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.3)
    exact = copy.deepcopy(base).double()
    plain = copy.deepcopy(base).to(dtype)
    ours = patch_model(copy.deepcopy(base).to(dtype))
    want, want_g = output_and_grads(exact, ids, mask)
    got_plain, plain_g = output_and_grads(plain, ids, mask)
    with OpLog() as log:
        got, got_g = output_and_grads(ours, ids, mask)
    assert_within_torch_error("logits", got, got_plain, want, dtype)
    assert got_g.keys() == want_g.keys() and got_g
    for name in want_g:
        assert_within_torch_error(name, got_g[name], plain_g[name], want_g[name], dtype)
    return log.names


@pytest.mark.parametrize("family", sorted(DECODER_CONFIGS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decoder_logits_and_grads_match_hf(family, dtype):
    ids, mask = batch()
    ops = check_against_fp64(lambda: tiny_decoder(family), dtype, None, ids, mask)
    assert {"pyengine.norm", "pyengine.rope", "pyengine.swiglu"} <= ops, ops


@pytest.mark.parametrize("targets,fused_mlp", [("all-linear", True),
                                               (["q_proj", "v_proj", "gate_proj"], False)])
def test_decoder_with_apply_lora(targets, fused_mlp):
    """LoRA on every linear (the MLP becomes lora_mlp: its own SwiGLU) or on some (the
    HF MLP stays and gets pyengine's swiglu); trainable parameters are only the adapters."""
    ids, mask = batch(1)
    ops = check_against_fp64(lambda: tiny_decoder("llama"), torch.bfloat16, targets, ids, mask)
    assert {"pyengine.norm", "pyengine.rope"} <= ops
    assert ("pyengine.lora_mlp" in ops) == fused_mlp and ("pyengine.swiglu" in ops) != fused_mlp


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bert_logits_and_grads_match_hf(dtype):
    ids, mask = batch(2)
    ops = check_against_fp64(tiny_bert, dtype, None, ids, mask)
    assert "pyengine.norm" in ops and "aten.native_layer_norm" not in ops, ops


def test_bert_output_blocks_fuse_the_residual():
    model = patch_model(tiny_bert())
    layer = model.bert.encoder.layer[0]
    assert isinstance(layer.output.LayerNorm, LayerNorm)
    assert isinstance(model.bert.embeddings.LayerNorm, LayerNorm)
    # the residual goes into the op: without it the block's output would differ
    h, inp = torch.randn(2, 5, 48), torch.randn(2, 5, 32)
    ln = layer.output.LayerNorm
    want = torch.nn.functional.layer_norm(layer.output.dense(h) + inp, (32,), ln.weight, ln.bias,
                                          ln.eps)
    torch.testing.assert_close(layer.output(h, inp), want, rtol=1e-5, atol=1e-5)


def test_generate_with_cache_unchanged():
    """Incremental decoding (a KV cache, position ids past the prompt) gives HF's tokens."""
    model = tiny_decoder("qwen2")
    ids = torch.randint(2, 61, (1, 6), generator=torch.Generator().manual_seed(3))
    want = model.generate(ids, max_new_tokens=6, do_sample=False)
    got = patch_model(copy.deepcopy(model)).generate(ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(got, want)


def test_state_dict_keys_idempotent_and_other_instance_untouched():
    model, other = tiny_decoder("llama"), tiny_decoder("llama")
    keys = list(model.state_dict())
    weight = model.model.layers[0].input_layernorm.weight
    patch_model(model)
    assert list(model.state_dict()) == keys
    assert model.model.layers[0].input_layernorm.weight is weight  # the same Parameter
    assert isinstance(model.model.norm, RMSNorm)
    forwards = [m.forward for m in model.modules()]
    ids, mask = batch()
    before = model(input_ids=ids, attention_mask=mask).logits
    patch_model(model)
    assert [m.forward for m in model.modules()] == forwards  # nothing re-wrapped
    assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, before)
    # the second instance and the class keep HF's own modules and forwards
    assert type(other.model.layers[0].input_layernorm).__name__ == "LlamaRMSNorm"
    attn = other.model.layers[0].self_attn
    assert "forward" not in vars(attn) and "forward" not in vars(other.model.layers[0])
    with OpLog() as log:
        other(input_ids=ids, attention_mask=mask)
    assert not any(n.startswith("pyengine.") for n in log.names)


def test_switches_leave_modules_alone():
    model = patch_model(tiny_decoder("llama"), rms_norm=False, swiglu=False)
    layer = model.model.layers[0]
    assert type(layer.input_layernorm).__name__ == "LlamaRMSNorm"
    assert "forward" not in vars(layer) and "forward" not in vars(layer.mlp)
    assert "forward" in vars(layer.self_attn)  # rope stays on


def test_refusals():
    cfg = transformers.GemmaConfig(vocab_size=61, hidden_size=32, intermediate_size=48,
                                   num_hidden_layers=1, num_attention_heads=4,
                                   num_key_value_heads=2, head_dim=8)
    with pytest.raises(ValueError, match=r"GemmaRMSNorm scales by \(1 \+ weight\)"):
        patch_model(transformers.GemmaForCausalLM(cfg))
    with pytest.raises(ValueError, match="nothing to patch in Sequential"):
        patch_model(torch.nn.Sequential(torch.nn.Linear(3, 3)))


def test_autocast_bf16_matches_hf_under_autocast():
    """An fp32 model trained under torch.autocast: same logits and grads as HF's."""
    model = tiny_decoder("llama")
    ours = patch_model(copy.deepcopy(model))
    ids, mask = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want, want_g = output_and_grads(model, ids, mask)
        got, got_g = output_and_grads(ours, ids, mask)
    exact, exact_g = output_and_grads(copy.deepcopy(model).double(), ids, mask)
    assert got.dtype == want.dtype
    assert_within_torch_error("logits", got, want, exact, torch.bfloat16)
    for name in exact_g:
        assert_within_torch_error(name, got_g[name], want_g[name], exact_g[name], torch.bfloat16)


def test_peft_wrapped_decoder():
    """A PEFT LoRA model holds the same HF modules under base_model.model: patched too."""
    peft = pytest.importorskip("peft")

    def build():
        model = peft.get_peft_model(tiny_decoder("mistral"), peft.LoraConfig(
            r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "up_proj"]))
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.3)
        return model
    ids, mask = batch(4)
    ops = check_against_fp64(build, torch.bfloat16, None, ids, mask)
    assert {"pyengine.norm", "pyengine.rope", "pyengine.swiglu"} <= ops


@pytest.mark.parametrize("family", sorted(DECODER_CONFIGS))
def test_attention_function_from_config_gets_hfs_arguments(family):
    """The patched attention calls the function config._attn_implementation names, with
    the arguments HF's forward passes (Mistral / Qwen2 add sliding_window): what another
    attention kernel registered there would receive."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]
    calls = []

    def recording(module, q, k, v, mask, **kwargs):
        calls.append((q, k, v, mask, kwargs))
        return sdpa(module, q, k, v, mask, **kwargs)
    ALL_ATTENTION_FUNCTIONS["pyengine_test_recording"] = recording
    try:
        model = tiny_decoder(family)
        model.config._attn_implementation = "pyengine_test_recording"
        ids, mask = batch(5)
        model(input_ids=ids, attention_mask=mask)
        hf_calls, calls[:] = list(calls), []
        patch_model(model)(input_ids=ids, attention_mask=mask)
    finally:
        del ALL_ATTENTION_FUNCTIONS["pyengine_test_recording"]
    assert len(calls) == len(hf_calls) == 2
    for (q, k, v, m, kw), (hq, hk, hv, hm, hkw) in zip(calls, hf_calls):
        assert kw.keys() == hkw.keys() and ("sliding_window" in kw) == (family != "llama")
        assert all(kw[n] == hkw[n] for n in kw if not isinstance(kw[n], torch.Tensor)), kw
        torch.testing.assert_close((q, k, v), (hq, hk, hv), rtol=1e-5, atol=1e-5)
        assert (m is None and hm is None) or torch.equal(m, hm)
