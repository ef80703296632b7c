"""pyengine.peft_lora.patch_peft_lora on tiny PEFT LoRA models (Llama, Mistral, Qwen2):
logits and the gradient of every LoRA parameter against PEFT's own forward, within
torch's error vs an fp64 copy (fp32, bf16 autocast, a bf16 model, dropout under a fixed
seed, rsLoRA, rank/alpha patterns, several target sets); our ops really run; PEFT's state
changes after patching (disable_adapter, merge, set_adapter, several adapters,
adapter_names) give PEFT's result; DoRA / lora bias layers stay on PEFT; idempotent;
removable; state_dict and save_pretrained output unchanged."""
import copy

import pytest
import torch
import transformers

peft = pytest.importorskip("peft")

from pyengine.peft_lora import patch_peft_lora  # noqa: E402
from tests.conftest import SLACK_ROUNDINGS, UNIT_ROUNDOFF  # noqa: E402
from tests.test_patch import OpLog, batch  # noqa: E402

CONFIGS = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
           "qwen2": transformers.Qwen2Config}  # qwen2: q/k/v carry a bias
MLP = ("gate_proj", "up_proj", "down_proj")


def tiny(family="llama", dtype=torch.float32, seed=0):
    cfg = CONFIGS[family](vocab_size=61, hidden_size=32, intermediate_size=48,
                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                          max_position_embeddings=64, initializer_range=0.3)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():  # HF inits biases to zero: a dropped bias would not show
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)
    return model.to(dtype)


def peft_model(family="llama", dtype=torch.float32, **lora):
    """A PEFT LoRA model with random (non-zero) A and B, so every adapter matters."""
    kw = dict(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    kw.update(lora)
    torch.manual_seed(1)
    return peft.get_peft_model(tiny(family, dtype), peft.LoraConfig(**kw))


def output_and_grads(model, ids, mask, autocast=False, seed=5):
    """Logits and {name: grad} of every trainable parameter, for a loss that weighs each
    logit differently (so every gradient path counts)."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # the same dropout masks in every copy
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logits = model(input_ids=ids, attention_mask=mask).logits
    weights = torch.randn(logits.shape, generator=torch.Generator().manual_seed(9),
                          dtype=torch.float64)
    (logits.double() * weights).sum().backward()
    return logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def assert_within_model_error(name, ours, plain, exact, dtype):
    """Per element: |ours - exact| <= 2 |plain - exact| + 3 max |plain - exact| + a few
    roundings (conftest's assert_within_torch_error with 3x, not 1x, torch's worst error
    of the tensor: through a whole model the small differences of every op compound, and
    ours measure up to ~1.8x torch's worst).  plain: PEFT in the same dtype, exact: fp64."""
    o, p, e = ours.double(), plain.double(), exact.double()
    assert o.shape == e.shape, f"{name}: shape {tuple(o.shape)} != {tuple(e.shape)}"
    plain_err = (p - e).abs()
    rounding = SLACK_ROUNDINGS[dtype] * UNIT_ROUNDOFF[dtype]
    allowed = 2 * plain_err + 3 * plain_err.max() + rounding * e.abs()
    excess = (o - e).abs() - allowed
    i = int(excess.argmax())
    assert excess.max() <= 0, (f"{name}: element {i}: ours {o.flatten()[i].item():.6g}, exact "
                               f"{e.flatten()[i].item():.6g}, PEFT {dtype} "
                               f"{p.flatten()[i].item():.6g}")


def check_against_peft(model, dtype, autocast=False, train=False, seed=0):
    """Patched vs PEFT's forward, each within torch's error vs an fp64 copy; returns the
    op counts of the patched run."""
    model.train(train)
    exact = copy.deepcopy(model).double()
    plain = copy.deepcopy(model)
    patch_peft_lora(model)
    ids, mask = batch(seed)
    want, want_g = output_and_grads(exact, ids, mask)
    got_plain, plain_g = output_and_grads(plain, ids, mask, autocast)
    with OpLog() as log:
        got, got_g = output_and_grads(model, ids, mask, autocast)
    assert_within_model_error("logits", got, got_plain, want, dtype)
    assert got_g.keys() == want_g.keys() and len(got_g) > 0
    for name in want_g:
        assert got_g[name].dtype == plain_g[name].dtype, name
        assert_within_model_error(name, got_g[name], plain_g[name], want_g[name], dtype)
    return log.counts


def lora_layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, peft.tuners.lora.Linear)}


@pytest.mark.parametrize("family", sorted(CONFIGS))
@pytest.mark.parametrize("dtype,autocast", [(torch.float32, False), (torch.bfloat16, True)],
                         ids=["fp32", "bf16-autocast"])
def test_all_linear_matches_peft(family, dtype, autocast):
    """Every projection adapted: attention layers run lora_linear, each MLP one lora_mlp."""
    model = peft_model(family)
    counts = check_against_peft(model, dtype, autocast)
    assert counts.get("pyengine.lora_linear") == 2 * 4  # q, k, v, o in 2 layers
    assert counts.get("pyengine.lora_mlp") == 2
    assert "aten.silu" not in counts  # the MLPs' SwiGLU is the fused op's


def test_bf16_model_matches_peft():
    """bf16 weights, fp32 adapters (PEFT's autocast_adapter_dtype), no autocast."""
    counts = check_against_peft(peft_model(dtype=torch.bfloat16), torch.bfloat16)
    assert counts.get("pyengine.lora_linear") == 8 and counts.get("pyengine.lora_mlp") == 2


@pytest.mark.parametrize("lora,linear,mlp", [
    (dict(target_modules=["q_proj", "v_proj"]), 4, 0),
    (dict(target_modules=["gate_proj", "up_proj"], use_rslora=True), 4, 0),
    (dict(target_modules=list(MLP), rank_pattern={"down_proj": 2},  # ranks differ,
          alpha_pattern={"down_proj": 4}), 0, 2),                  # one scale
    (dict(alpha_pattern={"down_proj": 3}), 8 + 6, 0),  # scales differ: the MLPs unfused
], ids=["qv", "gate-up-rslora", "mlp-rank-pattern", "alpha-pattern"])
def test_target_sets_match_peft(lora, linear, mlp):
    counts = check_against_peft(peft_model(**lora), torch.float32)
    assert counts.get("pyengine.lora_linear", 0) == linear
    assert counts.get("pyengine.lora_mlp", 0) == mlp


@pytest.mark.parametrize("dtype,autocast", [(torch.float32, False), (torch.bfloat16, True)],
                         ids=["fp32", "bf16-autocast"])
def test_dropout_in_training_matches_peft_under_a_seed(dtype, autocast):
    """nn.Dropout's keep-mask under the same seed; the MLPs (dropout) run per layer."""
    counts = check_against_peft(peft_model(lora_dropout=0.3), dtype, autocast, train=True)
    assert counts.get("pyengine.lora_linear") == 14 and "pyengine.lora_mlp" not in counts


def test_dropout_inactive_in_eval_fuses_the_mlp():
    counts = check_against_peft(peft_model(lora_dropout=0.3), torch.float32, train=False)
    assert counts.get("pyengine.lora_mlp") == 2


def logits(model, ids, mask, **kw):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, **kw).logits


def test_state_changes_after_patching_give_peft_results():
    """disable_adapter(), merge/unmerge, set_adapter, two active adapters, adapter_names:
    each call gives what PEFT's own forward gives in that state."""
    model = peft_model().eval()
    model.add_adapter("other", peft.LoraConfig(r=2, lora_alpha=5, target_modules=["q_proj"],
                                               init_lora_weights=False))
    plain = copy.deepcopy(model)
    assert patch_peft_lora(model) == 14
    ids, mask = batch(3)
    base = tiny().eval()

    def same(**kw):
        with OpLog() as log:
            got = logits(model, ids, mask, **kw)
        torch.testing.assert_close(got, logits(plain, ids, mask, **kw), atol=2e-5, rtol=1e-5)
        return log.counts

    assert same().get("pyengine.lora_mlp") == 2
    with model.disable_adapter(), plain.disable_adapter():
        counts = same()
        torch.testing.assert_close(logits(model, ids, mask), logits(base, ids, mask),
                                   atol=0, rtol=0)
    assert not any(k.startswith("pyengine.lora") for k in counts)
    model.merge_adapter(), plain.merge_adapter()
    assert not any(k.startswith("pyengine.lora") for k in same())
    model.unmerge_adapter(), plain.unmerge_adapter()
    assert same().get("pyengine.lora_mlp") == 2
    for m in (model, plain):
        m.set_adapter("other")
    assert same().get("pyengine.lora_linear") == 2  # only q_proj has "other"
    for m in (model, plain):
        m.base_model.set_adapter(["default", "other"])
    assert not any(k.startswith("pyengine.lora") for k in same())
    for m in (model, plain):
        m.set_adapter("default")
    mixed = same(adapter_names=["default", "__base__", "other"])  # PEFT's mixed batch
    assert not any(k.startswith("pyengine.lora") for k in mixed)
    assert same().get("pyengine.lora_mlp") == 2


def test_scaling_changed_after_patching_is_read_at_call_time():
    model = peft_model().eval()
    plain = copy.deepcopy(model)
    patch_peft_lora(model)
    for m in (model, plain):
        for layer in lora_layers(m).values():
            layer.scale_layer(0.5)
    ids, mask = batch(4)
    torch.testing.assert_close(logits(model, ids, mask), logits(plain, ids, mask), atol=2e-5,
                               rtol=1e-5)


@pytest.mark.parametrize("lora", [dict(use_dora=True), dict(lora_bias=True),
                                  dict(dtype=torch.float16)],  # lora_linear: fp32 / bf16
                         ids=["dora", "lora-bias", "fp16-base"])
def test_layers_pyengine_cannot_run_exactly_stay_on_peft(lora):
    model = peft_model(**lora).eval()
    plain = copy.deepcopy(model)
    assert patch_peft_lora(model) == 0
    assert not any("forward" in m.__dict__ for m in model.modules())
    ids, mask = batch(5)
    torch.testing.assert_close(logits(model, ids, mask), logits(plain, ids, mask), atol=0, rtol=0)


def test_patch_is_idempotent_and_removable():
    model = peft_model().eval()
    assert patch_peft_lora(model) == 14
    bound = {n: m.__dict__["forward"] for n, m in model.named_modules() if "forward" in m.__dict__}
    assert len(bound) == 14 + 2  # the LoRA layers and the two MLPs
    assert all(f.__func__.__module__ == "pyengine.peft_lora" for f in bound.values())
    assert patch_peft_lora(model) == 14
    assert {n: m.__dict__["forward"] for n, m in model.named_modules()
            if "forward" in m.__dict__} == bound
    for m in model.modules():  # what unpatch does: drop pyengine's instance forwards
        m.__dict__.pop("forward", None)
    with OpLog() as log:
        logits(model, *batch())
    assert not any(k.startswith("pyengine.") for k in log.counts)


def test_state_dict_and_save_pretrained_unchanged_by_patching(tmp_path):
    """A model trained a few steps, saved, patched, saved again: identical bytes."""
    model = peft_model(init_lora_weights=True)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids, mask = batch(6)
    for _ in range(2):
        model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
        opt.step(), opt.zero_grad()
    keys = list(model.state_dict())
    model.save_pretrained(tmp_path / "before")
    assert patch_peft_lora(model) == 14
    model.save_pretrained(tmp_path / "after")
    assert list(model.state_dict()) == keys
    names = sorted(p.name for p in (tmp_path / "before").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "after").iterdir())
    assert "adapter_model.safetensors" in names
    for name in names:
        assert (tmp_path / "before" / name).read_bytes() == (tmp_path / "after" / name).read_bytes()


def test_model_without_peft_layers_is_left_alone():
    model = tiny().eval()
    assert patch_peft_lora(model) == 0
    assert not any("forward" in m.__dict__ for m in model.modules())
