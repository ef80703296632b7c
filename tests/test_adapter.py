"""One adapter reader (pyengine.lora.read_adapter) for load_adapter, infer and export: real
PEFT adapters on tiny Llama models give PEFT's own merged model (merge_and_unload) in all
three, and what cannot be applied exactly (DoRA, LoRA variants, biases, embedding LoRA...) is
a clear error naming the feature and the file."""
import json

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

from pyengine.export import main as export_main, to_gguf  # noqa: E402
from pyengine.infer import ModelLoadError, load_model  # noqa: E402
from pyengine.infer.model import interleave_rope_rows  # noqa: E402
from pyengine.lora import AdapterError, apply_lora, load_adapter, lora_modules, merge_lora  # noqa: E402
from tests.tiny_llama import save_tiny_model  # noqa: E402

IDS = [0, 17, 5, 240, 33, 101, 7, 64, 12]


@pytest.fixture(scope="module", params=["tied", "untied"])
def base(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(f"base_{request.param}")
    save_tiny_model(path, seed=4, tie_word_embeddings=request.param == "tied")
    return path


def hf(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path).eval()


def logits(model):
    with torch.no_grad():
        return model(input_ids=torch.tensor([IDS])).logits[0]


# Each case is a LoraConfig; patterns use keys that PEFT's rule ("key matches the end of the
# module path", a regex) and a short-name lookup match differently.
CASES = {
    "modules_to_save_lm_head": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                    modules_to_save=["lm_head"]),
    "mixed_patterns": dict(r=4, lora_alpha=8,
                           target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"],
                           rank_pattern={"layers.1.self_attn.q_proj": 2, r"layers\.0\.mlp\.down_proj": 6},
                           alpha_pattern={"self_attn.v_proj": 3, "layers.1.self_attn.o_proj": 20,
                                          "o_proj": 5}),
    "rslora": dict(r=4, lora_alpha=8, target_modules="all-linear", use_rslora=True,
                   rank_pattern={"gate_proj": 2}),
}


def save_peft_adapter(base_dir, out, seed=5, **config):
    model = peft.get_peft_model(hf(base_dir), peft.LoraConfig(**config))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "lora_B" in name or "modules_to_save" in name:  # B = 0 would merge to nothing
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    model.eval().save_pretrained(out)
    return model


@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_adapter_applies_like_peft_merge(base, tmp_path, case):
    peft_model = save_peft_adapter(base, tmp_path / "adapter", **CASES[case])
    merged = peft_model.merge_and_unload()
    want = logits(merged)
    assert (want - logits(hf(base))).abs().max() > 0.1  # the adapter changes the output
    # infer: the adapter merged in fp32 into the decoder's weights
    got = load_model(base, adapter=tmp_path / "adapter").forward(torch.tensor(IDS), 0, all_logits=True)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # lora.load_adapter (+ merge_lora) on the transformers model
    ours = load_adapter(hf(base), tmp_path / "adapter", fuse_mlp=False)
    torch.testing.assert_close(logits(ours), want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logits(merge_lora(ours)), want, rtol=1e-4, atol=1e-4)
    # export: every weight of the f32 GGUF is PEFT's merged weight (q/k in rope order)
    reader = gguf.GGUFReader(to_gguf(base, tmp_path / "m.gguf", "f32", adapter=tmp_path / "adapter"))
    tensors = {t.name: torch.from_numpy(t.data.copy()) for t in reader.tensors}
    sd, cfg = merged.state_dict(), merged.config
    head_untied = not cfg.tie_word_embeddings or "modules_to_save" in CASES[case]
    assert ("output.weight" in tensors) == head_untied
    if head_untied:
        torch.testing.assert_close(tensors["output.weight"], sd["lm_head.weight"], rtol=0, atol=1e-6)
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        pairs = {"attn_q": interleave_rope_rows(sd[p + "self_attn.q_proj.weight"], 4),
                 "attn_k": interleave_rope_rows(sd[p + "self_attn.k_proj.weight"], 2),
                 "attn_v": sd[p + "self_attn.v_proj.weight"], "attn_output": sd[p + "self_attn.o_proj.weight"],
                 "ffn_gate": sd[p + "mlp.gate_proj.weight"], "ffn_down": sd[p + "mlp.down_proj.weight"]}
        for short, w in pairs.items():
            torch.testing.assert_close(tensors[f"blk.{i}.{short}.weight"], w, rtol=0, atol=1e-6)


def test_dora_is_refused_everywhere(base, tmp_path, capsys):
    save_peft_adapter(base, tmp_path, r=4, lora_alpha=8, target_modules=["q_proj"], use_dora=True)
    cfg_file = str(tmp_path / "adapter_config.json")
    with pytest.raises(ModelLoadError, match=rf"{cfg_file}: DoRA .*use_dora=True"):
        load_model(base, adapter=tmp_path)
    with pytest.raises(AdapterError, match=rf"{cfg_file}: DoRA"):
        load_adapter(hf(base), tmp_path)
    out = tmp_path / "m.gguf"
    assert export_main([str(base), str(out), "--fmt", "f32", "--adapter", str(tmp_path)]) == 2
    assert "error: " in capsys.readouterr().err and not out.exists()


@pytest.mark.parametrize("edit,feature", [
    (dict(bias="lora_only"), "trained biases"), (dict(fan_in_fan_out=True), "fan_in_fan_out"),
    (dict(layer_replication=[[0, 1]]), "layer replication"), (dict(use_qalora=True), "QALoRA"),
    (dict(lora_bias=True), "lora_bias"), (dict(peft_type="LOHA"), "peft_type 'LOHA'"),
    (dict(trainable_token_indices=[1, 2]), "trainable tokens"),
])
def test_unsupported_options_are_refused(base, tmp_path, edit, feature):
    save_peft_adapter(base, tmp_path, r=4, lora_alpha=8, target_modules=["q_proj"])
    cfg_file = tmp_path / "adapter_config.json"
    cfg_file.write_text(json.dumps({**json.loads(cfg_file.read_text()), **edit}))
    with pytest.raises(AdapterError, match=rf"{cfg_file}: .*{feature}"):
        load_adapter(hf(base), tmp_path)
    with pytest.raises(ModelLoadError, match=rf"{cfg_file}: .*{feature}"):
        load_model(base, adapter=tmp_path)


def test_embedding_lora_is_refused(base, tmp_path):
    save_peft_adapter(base, tmp_path, r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"])
    with pytest.raises(ModelLoadError, match="LoRA on an embedding layer .*embed_tokens"):
        load_model(base, adapter=tmp_path)
    with pytest.raises(AdapterError, match="LoRA on an embedding layer"):
        load_adapter(hf(base), tmp_path)


def test_modules_to_save_that_cannot_be_placed(base, tmp_path):
    """A classification head saved with the adapter has no place in a causal-LM decoder."""
    save_peft_adapter(base, tmp_path, r=4, lora_alpha=8, target_modules=["q_proj"])
    weights = tmp_path / "adapter_model.safetensors"
    from safetensors.torch import load_file, save_file
    tensors = load_file(str(weights))
    tensors["base_model.model.score.weight"] = torch.zeros(3, 64)
    save_file(tensors, str(weights))
    with pytest.raises(ModelLoadError, match=r"base_model.model.score.weight \[3, 64\] cannot be placed"):
        load_model(base, adapter=tmp_path)


def test_lora_on_a_tied_lm_head_is_refused(tmp_path):
    save_tiny_model(tmp_path / "base", seed=4, tie_word_embeddings=True)
    save_peft_adapter(tmp_path / "base", tmp_path / "a", r=4, lora_alpha=8, target_modules=["lm_head"])
    with pytest.raises(ModelLoadError, match="LoRA on lm_head, which shares its weight"):
        load_model(tmp_path / "base", adapter=tmp_path / "a")


def test_target_modules_string_is_a_name_or_a_regex(base):
    names = lambda model: sorted(lora_modules(model))  # noqa: E731
    q = [f"model.layers.{i}.self_attn.q_proj" for i in range(2)]
    assert names(apply_lora(hf(base), r=2, target_modules="q_proj")) == q  # one name
    assert names(apply_lora(hf(base), r=2, target_modules=["q_proj"])) == q
    assert names(apply_lora(hf(base), r=2, target_modules=r".*\.1\.self_attn\.q_proj")) == q[1:]  # regex
    assert names(apply_lora(hf(base), r=2, target_modules=q[0])) == q[:1]  # a full path
    with pytest.raises(ValueError, match=r"no nn.Linear module matches target_modules='q_proj\|zz'"):
        apply_lora(hf(base), r=2, target_modules="q_proj|zz")  # a regex: fullmatches nothing
    with pytest.raises(ValueError, match="no nn.Linear module matches target_modules='nothing'"):
        apply_lora(hf(base), r=2, target_modules="nothing")


def test_gpt2_conv1d_is_not_supported():
    cfg = transformers.GPT2Config(vocab_size=50, n_embd=32, n_layer=1, n_head=2, n_positions=32)
    model = transformers.GPT2LMHeadModel(cfg)
    for targets in ("all-linear", ["c_attn"], "c_attn"):
        with pytest.raises(ValueError, match=r"architecture not supported: Conv1D layers \(GPT-2 style\)"):
            apply_lora(model, r=2, target_modules=targets)
