"""pyengine.patch / unpatch on tiny HF models: patched vs unpatched logits, losses and
gradients within torch's own error (vs an fp64 copy), with padding, fp32 and bf16, with and
without apply_lora / PEFT; our ops actually run; state-dict keys, idempotence, other
instances, unpatch, torch.compile, the AutoModel wrappers."""
import copy
import logging

import pytest
import torch
import torch.nn.functional as F
import transformers
from torch.utils._python_dispatch import TorchDispatchMode

import pyengine
from pyengine import patching
from pyengine.lora import apply_lora
from pyengine.nn import GemmaRMSNorm, LayerNorm, RMSNorm
from tests.conftest import assert_within_torch_error

DECODER_CONFIGS = {
    "llama": transformers.LlamaConfig,
    "mistral": transformers.MistralConfig,
    "qwen2": transformers.Qwen2Config,
    "gemma": transformers.GemmaConfig,
    "gemma2": transformers.Gemma2Config,
}
# Gemma: head_dim set (default 256); Gemma2: a sliding window shorter than the batch, the
# attention softcap (HF runs it in eager attention) and the final logit softcap on, init
# 0.2 (at 0.3 its bf16 logits' rounding noise, ours and torch's of the same mean size,
# is too chaotic for the per-element bound)
FAMILY_KWARGS = {
    "gemma": dict(head_dim=8),
    "gemma2": dict(head_dim=8, sliding_window=4, attn_implementation="eager",
                   attn_logit_softcapping=20.0, final_logit_softcapping=10.0,
                   initializer_range=0.2),
}


def patch_model(model, **kw):
    """pyengine.patch without the attention kernel (tested in test_attention.py): the
    modules and forwards these tests compare against HF's."""
    return pyengine.patch(model, attention=False, **kw)


def tiny_decoder(family, seed=0, **overrides):
    kwargs = dict(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                  initializer_range=0.3, rms_norm_eps=1e-5, attn_implementation="sdpa")
    kwargs.update(FAMILY_KWARGS.get(family, {}), **overrides)
    cfg = DECODER_CONFIGS[family](**kwargs)
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


def _gemma_norm_fp64(self, x):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * (1 + self.weight)


def fp64_copy(model):
    """An fp64 copy of the model; Gemma's norms (which upcast to fp32 only) computed in
    fp64 too, so the reference has no fp32 error."""
    exact = copy.deepcopy(model).double()
    for m in exact.modules():
        if type(m).__name__ in ("GemmaRMSNorm", "Gemma2RMSNorm"):
            m.forward = _gemma_norm_fp64.__get__(m)
    return exact


class OpLog(TorchDispatchMode):
    """How often each op is dispatched inside the block (`names`: which ones)."""

    def __init__(self):
        super().__init__()
        self.counts = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **(kwargs or {}))

    @property
    def names(self) -> set:
        return set(self.counts)


def check_against_fp64(build, dtype, lora, ids, mask, patch=patch_model):
    base = build()
    if lora:
        apply_lora(base, r=4, alpha=8, target_modules=lora)
        with torch.no_grad():  # non-zero B so the adapters' gradients flow everywhere
            for n, p in base.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.3)
    exact = fp64_copy(base)
    plain = copy.deepcopy(base).to(dtype)
    ours = patch(copy.deepcopy(base).to(dtype))
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
    if family == "gemma2":  # HF's fp64 eager attention: NaN rows from fully masked queries
        mask[1] = 1  # (left padding); right padding stays
    ops = check_against_fp64(lambda: tiny_decoder(family), dtype, None, ids, mask)
    assert {"pyengine.norm", "pyengine.rope"} <= ops, ops
    assert ("pyengine.swiglu" in ops) == (not family.startswith("gemma"))  # GeGLU left alone


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
    with pytest.raises(ValueError, match="nothing to patch in Sequential"):
        patch_model(torch.nn.Sequential(torch.nn.Linear(3, 3)))


def test_fused_loss_refuses_a_logit_scale_it_does_not_apply():
    """Cohere multiplies its logits by config.logit_scale: the fused causal-LM loss (which
    finetune uses for any decoder) must refuse it, not return the unscaled model's loss."""
    from pyengine import models
    cfg = transformers.CohereConfig(vocab_size=61, hidden_size=32, intermediate_size=48,
                                    num_hidden_layers=1, num_attention_heads=4,
                                    num_key_value_heads=2, logit_scale=0.5)
    model = transformers.CohereForCausalLM(cfg)
    ids, mask = batch()
    data = dict(input_ids=ids, attention_mask=mask, labels=ids)
    with pytest.raises(ValueError, match=r"CohereConfig.logit_scale = 0.5 scales the logits"):
        models.training_loss("causal-lm", model, data, 10, torch.float32)


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
    ids, mask = batch(4)  # (PEFT's LoRA layers on our ops: tests/test_peft_lora.py)
    ops = check_against_fp64(build, torch.bfloat16, None, ids, mask,
                             patch=lambda m: patch_model(m, lora=False))
    assert {"pyengine.norm", "pyengine.rope", "pyengine.swiglu"} <= ops


@pytest.mark.parametrize("family", sorted(DECODER_CONFIGS))
def test_attention_function_from_config_gets_hfs_arguments(family):
    """The patched attention calls the function config._attn_implementation names, with
    the arguments HF's forward passes (Mistral / Qwen2 add sliding_window, Gemma2 also
    softcap): what another
    attention kernel registered there would receive."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]
    calls = []

    def recording(module, q, k, v, mask, **kwargs):
        calls.append((q, k, v, mask, kwargs))  # (sdpa has no softcap: the same for both runs)
        return sdpa(module, q, k, v, mask, **{n: x for n, x in kwargs.items() if n != "softcap"})
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
        assert kw.keys() == hkw.keys()
        assert ("sliding_window" in kw) == (family in ("mistral", "qwen2", "gemma2"))
        assert ("softcap" in kw) == (family == "gemma2")
        assert all(kw[n] == hkw[n] for n in kw if not isinstance(kw[n], torch.Tensor)), kw
        torch.testing.assert_close((q, k, v), (hq, hk, hv), rtol=1e-5, atol=1e-5)
        assert (m is None and hm is None) or torch.equal(m, hm)


# --------------------------------------------------------------------------- fused loss
def labels_for(ids, mask):
    """Padding unlabelled, an unlabelled prompt in row 0, row 2 unlabelled entirely."""
    labels = ids.masked_fill(mask == 0, -100)
    labels[0, :5] = -100
    labels[2] = -100
    return labels


def exact_hf_loss(model64, ids, mask, labels, num_items):
    """transformers' ForCausalLMLoss in fp64 (HF's own upcasts to fp32): targets shifted by
    one, -100 ignored, mean over labelled targets or sum / num_items."""
    logits = model64(input_ids=ids, attention_mask=mask).logits  # logit softcap included
    target = labels[:, 1:]
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), target.reshape(-1),
                           ignore_index=-100, reduction="sum")
    return loss / (float(num_items) if num_items is not None else int((target != -100).sum()))


def loss_and_grads(model, compute):
    model.zero_grad()
    loss = compute(model)
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()
                           if p.requires_grad}


def check_loss_against_fp64(base, dtype, ids, mask, labels, num_items):
    """The patched forward's loss and every gradient vs HF's forward with labels, both
    within torch's error of the fp64 loss; fp32 models run under bf16 autocast for bf16.
    Returns the ops the patched run dispatched and its output."""
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)
    extra = {} if num_items is None else {"num_items_in_batch": num_items}
    want, want_g = loss_and_grads(fp64_copy(base),
                                  lambda m: exact_hf_loss(m, ids, mask, labels, num_items))
    with autocast:
        plain, plain_g = loss_and_grads(copy.deepcopy(base), lambda m: m(
            input_ids=ids, attention_mask=mask, labels=labels, **extra).loss)
    ours_model = pyengine.patch(copy.deepcopy(base)).train()  # (no dropout in these configs)
    outputs = []
    with autocast, OpLog() as log:
        got, got_g = loss_and_grads(ours_model, lambda m: outputs.append(m(
            input_ids=ids, attention_mask=mask, labels=labels, **extra)) or outputs[0].loss)
    # HF's loss agrees with the fp64 reference (so the reference is HF's semantics)
    torch.testing.assert_close(plain.double(), want, rtol=2e-2 if dtype == torch.bfloat16
                               else 1e-5, atol=0)
    assert_within_torch_error("loss", got, plain, want, dtype)
    assert got_g.keys() == want_g.keys() and got_g
    for name in want_g:
        assert_within_torch_error(name, got_g[name], plain_g[name], want_g[name], dtype)
    return log.names, outputs[0]


@pytest.mark.parametrize("num_items", [None, torch.tensor(23)], ids=["mean", "num_items"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma", "gemma2"])
def test_causal_lm_forward_with_labels_fused_loss_equals_hf(family, dtype, num_items):
    """With labels the patched forward returns HF's loss (Gemma2: final logit softcap on)
    from the fused op, and no logits."""
    ids, mask = batch(3)
    if family == "gemma2":  # HF's fp64 eager attention: NaN rows for left padding
        mask[1] = 1
    ops, out = check_loss_against_fp64(tiny_decoder(family), dtype, ids, mask,
                                       labels_for(ids, mask), num_items)
    assert out.logits is None and "pyengine.linear_cross_entropy" in ops, ops


def test_fused_loss_through_a_peft_model():
    """peft.get_peft_model(model): PEFT calls the inner model's (patched) forward; the
    LoRA gradients equal HF's within bf16 error; state-dict keys unchanged."""
    peft = pytest.importorskip("peft")
    base = peft.get_peft_model(tiny_decoder("llama"), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"]))
    with torch.no_grad():
        for n, p in base.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    keys = list(base.state_dict())
    ids, mask = batch(7)
    ops, out = check_loss_against_fp64(base, torch.bfloat16, ids, mask, labels_for(ids, mask), 17)
    assert out.logits is None and "pyengine.linear_cross_entropy" in ops
    assert list(pyengine.patch(copy.deepcopy(base)).state_dict()) == keys


def test_eval_mode_keeps_the_logits_unless_skip_logits():
    """In eval mode (Trainer.evaluate / predict read the logits) the patched forward with
    labels is HF's: logits and loss; skip_logits=True gives the fused loss there too, and
    skip_logits=False HF's forward in training."""
    model = tiny_decoder("llama")
    ours = pyengine.patch(copy.deepcopy(model), attention=False)
    ids, mask = batch(3)
    labels = labels_for(ids, mask)
    want = model(input_ids=ids, attention_mask=mask, labels=labels)
    out = ours(input_ids=ids, attention_mask=mask, labels=labels)
    assert out.logits is not None
    torch.testing.assert_close(out.loss, want.loss, rtol=1e-5, atol=0)
    fused = ours(input_ids=ids, attention_mask=mask, labels=labels, skip_logits=True)
    assert fused.logits is None
    torch.testing.assert_close(fused.loss, want.loss, rtol=1e-5, atol=0)
    assert ours.train()(input_ids=ids, attention_mask=mask, labels=labels,
                        skip_logits=False).logits is not None


def test_causal_lm_forward_keywords():
    """shift_labels (given: used as is, unshifted), return_dict=False, logits_to_keep on
    the no-labels path: as HF's forward (only the loss part patched: same bits)."""
    model = tiny_decoder("mistral")
    ours = pyengine.patch(copy.deepcopy(model), rms_norm=False, rope=False, swiglu=False,
                          attention=False)
    ids, mask = batch(8)
    labels = labels_for(ids, mask)
    shift = torch.roll(labels, -2, dims=1)  # not labels shifted by one
    ours.train()  # (no dropout in these configs)
    for kw in (dict(labels=labels, shift_labels=shift), dict(labels=labels)):
        want = model(input_ids=ids, attention_mask=mask, **kw).loss
        got = ours(input_ids=ids, attention_mask=mask, return_dict=False, **kw)
        torch.testing.assert_close(got[0], want, rtol=1e-6, atol=0)
    want = model(input_ids=ids, attention_mask=mask, logits_to_keep=2).logits
    assert torch.equal(ours(input_ids=ids, attention_mask=mask, logits_to_keep=2).logits, want)


# --------------------------------------------------------------------------- Gemma2 attention
def test_attention_softcapping_is_refused_not_ignored(caplog):
    """Gemma2 softcaps attention logits; pyengine attention does not: use_pyengine_attention
    refuses it (patch keeps HF's attention and warns), and the attention function refuses
    a softcap it is handed instead of dropping it."""
    from pyengine.nn.attention import _register, use_pyengine_attention
    model = tiny_decoder("gemma2")
    with pytest.raises(ValueError, match=r"attn_logit_softcapping = 20.0"):
        use_pyengine_attention(model)
    with caplog.at_level(logging.WARNING, logger="pyengine.patching"):
        pyengine.patch(model)
    assert model.config._attn_implementation == "eager" and "attn_logit_softcapping" in caplog.text
    _register()
    model.config._attn_implementation = "pyengine"
    with pytest.raises(ValueError, match="Gemma2Attention softcaps its attention logits"):
        model(input_ids=batch()[0])


def test_gemma2_without_attention_softcap_runs_pyengine_attention():
    ids, mask = batch(9)
    mask[1] = 1
    ops = check_against_fp64(lambda: tiny_decoder("gemma2", attn_logit_softcapping=None),
                             torch.float32, None, ids, mask, patch=pyengine.patch)
    assert {"pyengine.attention", "pyengine.norm", "pyengine.rope"} <= ops, ops


# --------------------------------------------------------------------------- unpatch
@pytest.mark.parametrize("family", ["llama", "gemma2", "bert"])
def test_unpatch_restores_modules_forwards_and_outputs(family):
    model = tiny_bert() if family == "bert" else tiny_decoder(family)
    twin = copy.deepcopy(model)
    modules = [(n, type(m)) for n, m in model.named_modules()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    implementation = model.config._attn_implementation
    pyengine.patch(model)
    pyengine.patch(model)  # twice is once
    assert list(model.state_dict()) == list(state)
    # new Parameter objects in the replaced modules (as load_state_dict(assign=True) makes):
    # the modules put back must hold these, not the ones they had before patch
    for m in model.modules():
        if type(m) in (RMSNorm, GemmaRMSNorm, LayerNorm):
            m.weight = torch.nn.Parameter(m.weight.detach().clone())
    params = dict(model.named_parameters())
    assert any(type(m) in (RMSNorm, GemmaRMSNorm, LayerNorm) for m in model.modules())
    assert pyengine.unpatch(model) is model
    assert [(n, type(m)) for n, m in model.named_modules()] == modules
    assert all(p is params[n] for n, p in model.named_parameters())
    assert model.config._attn_implementation == implementation
    assert not [(type(m).__name__, k) for m in model.modules() for k in vars(m)
                if k == "forward" or k.startswith("_pyengine")]
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    ids, mask = batch(10)
    got, got_g = output_and_grads(model, ids, mask)
    want, want_g = output_and_grads(twin, ids, mask)
    assert torch.equal(got, want)
    assert all(torch.equal(got_g[n], want_g[n]) for n in want_g)


def test_patch_binds_forwards_on_the_instance_only():
    """Another instance of the same class, and the class, keep HF's forward."""
    model, other = tiny_decoder("qwen2"), tiny_decoder("qwen2")
    pyengine.patch(model)
    assert model.forward.__func__ is patching._causal_lm_forward
    assert "forward" not in vars(other)
    assert type(other).forward is transformers.Qwen2ForCausalLM.forward
    ids, mask = batch()
    assert other(input_ids=ids, attention_mask=mask, labels=ids).logits is not None


# --------------------------------------------------------------------------- compile
def test_torch_compile_patched_forward_backward_with_labels():
    model = pyengine.patch(tiny_decoder("llama"), attention=False).train()  # fused loss
    ids, mask = batch(11)
    labels = labels_for(ids, mask)
    want, want_g = loss_and_grads(model, lambda m: m(input_ids=ids, attention_mask=mask,
                                                     labels=labels).loss)
    compiled = torch.compile(model, backend="aot_eager")
    got, got_g = loss_and_grads(model, lambda m: compiled(input_ids=ids, attention_mask=mask,
                                                          labels=labels).loss)
    assert compiled(input_ids=ids, attention_mask=mask, labels=labels).logits is None
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    for name in want_g:
        torch.testing.assert_close(got_g[name], want_g[name], rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- wrappers
def test_auto_model_wrappers_load_and_patch(tmp_path):
    from tests.tiny_hf import make_bert, make_llama
    llama, bert = make_llama(tmp_path / "llama"), make_bert(tmp_path / "bert")
    model = pyengine.AutoModelForCausalLM.from_pretrained(llama)
    assert type(model) is transformers.LlamaForCausalLM
    assert model.forward.__func__ is patching._causal_lm_forward
    assert isinstance(model.model.norm, RMSNorm) and model.config._attn_implementation == "pyengine"
    model = pyengine.AutoModelForCausalLM.from_pretrained(
        llama, patch=dict(cross_entropy=False, attention=False))
    assert "forward" not in vars(model) and model.config._attn_implementation != "pyengine"
    assert isinstance(model.model.norm, RMSNorm)
    for auto in (pyengine.AutoModelForSequenceClassification,
                 pyengine.AutoModelForTokenClassification):
        model = auto.from_pretrained(bert, num_labels=3)
        assert model.num_labels == 3 and model.config._attn_implementation == "pyengine"
        norms = [m for m in model.modules() if "LayerNorm" in type(m).__name__]
        assert norms and all(type(m) is LayerNorm for m in norms)


def test_finetune_loss_applies_gemma2_final_logit_softcap():
    """models.training_loss (what pyengine.finetune runs) on Gemma2: HF's softcapped loss."""
    from pyengine import models
    model = tiny_decoder("gemma2", final_logit_softcapping=1.0)
    ids, mask = batch(3)
    mask[1] = 1
    data = dict(input_ids=ids, attention_mask=mask, labels=labels_for(ids, mask))
    with torch.no_grad():
        want = model(**data, num_items_in_batch=11).loss
        got = models.training_loss("causal-lm", model, data, 11, torch.float32)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0)


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "autocast"])
def test_norm_output_cast_once_for_its_consumers(autocast):
    """Under bf16 autocast q / k / v (and gate / up) get the same bf16 tensor, cast once
    from the norm's output (each used to cast it again and keep its own copy for
    backward); outside autocast the fp32 output itself."""
    model = patch_model(tiny_decoder("llama"))
    seen = {}
    for name in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"):
        for path, m in model.named_modules():
            if path.endswith("layers.0.self_attn." + name) or path.endswith("layers.0.mlp." + name):
                m.register_forward_pre_hook(lambda mod, args, name=name: seen.__setitem__(
                    name, args[0]))
    ids, mask = batch(2)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        model(input_ids=ids, attention_mask=mask)
    want = torch.bfloat16 if autocast else torch.float32
    assert seen["q_proj"] is seen["k_proj"] is seen["v_proj"]
    assert seen["gate_proj"] is seen["up_proj"]
    assert seen["q_proj"].dtype == seen["gate_proj"].dtype == want


def test_gradient_checkpointing_still_checkpoints_patched_decoder_layers():
    """transformers checkpoints a decoder layer in its class forward; the patched layer's
    instance forward must checkpoint too (it silently did not: every activation was kept),
    with the same loss and gradients as without checkpointing."""
    ids, mask = batch(3)
    plain = patch_model(tiny_decoder("llama")).train()
    ours = copy.deepcopy(plain)
    ours.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    calls = []
    for layer in ours.model.layers:
        checkpoint = layer._gradient_checkpointing_func
        layer._gradient_checkpointing_func = (
            lambda fn, *a, checkpoint=checkpoint, **k: calls.append(1) or checkpoint(fn, *a, **k))
    got, got_g = output_and_grads(ours, ids, mask)
    want, want_g = output_and_grads(plain, ids, mask)
    assert len(calls) == len(ours.model.layers)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    for name in want_g:
        torch.testing.assert_close(got_g[name], want_g[name], rtol=1e-6, atol=1e-7)
