"""pyengine.export.to_gguf: the GGUF reads back with gguf.GGUFReader with our exact weights
(q/k in llama.cpp's rope order), llama metadata and the BPE tokenizer; llama.cpp (when
llama-cpp-python is installed) tokenizes and decodes like we do."""
import pytest
import torch

gguf = pytest.importorskip("gguf")
from pyengine.export import to_gguf  # noqa: E402
from pyengine.infer import ModelLoadError, generate_ids, load_model  # noqa: E402
from pyengine.infer.model import interleave_rope_rows  # noqa: E402
from pyengine.quant import quantize  # noqa: E402
from tests.tiny_llama import save_tiny_model  # noqa: E402

PROMPT = "hello world, the quick"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_export")
    hf, tok = save_tiny_model(path, seed=3)
    return path, hf, tok


def field(reader, key):
    f = reader.fields[key]
    return f.contents()


@pytest.mark.parametrize("fmt", ["f32", "q8_0", "q4_0"])
def test_gguf_reads_back_with_our_weights(tiny, tmp_path, fmt):
    path, hf, tok = tiny
    out = to_gguf(path, tmp_path / f"m-{fmt}.gguf", fmt)
    reader = gguf.GGUFReader(out)
    cfg = hf.config
    assert field(reader, "general.architecture") == "llama"
    assert field(reader, "llama.block_count") == cfg.num_hidden_layers
    assert field(reader, "llama.attention.head_count_kv") == cfg.num_key_value_heads
    assert field(reader, "llama.rope.freq_base") == pytest.approx(500.0)
    assert field(reader, "tokenizer.ggml.model") == "gpt2"
    assert field(reader, "tokenizer.ggml.pre") == "gpt-2"
    assert field(reader, "tokenizer.ggml.tokens")[:2] == ["<s>", "</s>"]
    assert field(reader, "tokenizer.ggml.eos_token_id") == 1
    assert len(field(reader, "tokenizer.ggml.merges")) > 10

    sd = hf.state_dict()
    expected = {"token_embd.weight": sd["model.embed_tokens.weight"],
                "output_norm.weight": sd["model.norm.weight"],
                "blk.1.attn_q.weight": interleave_rope_rows(sd["model.layers.1.self_attn.q_proj.weight"], 4),
                "blk.1.attn_k.weight": interleave_rope_rows(sd["model.layers.1.self_attn.k_proj.weight"], 2),
                "blk.0.attn_v.weight": sd["model.layers.0.self_attn.v_proj.weight"],
                "blk.0.ffn_down.weight": sd["model.layers.0.mlp.down_proj.weight"],
                "blk.1.ffn_norm.weight": sd["model.layers.1.post_attention_layernorm.weight"]}
    tensors = {t.name: t for t in reader.tensors}
    assert "output.weight" not in tensors  # tied embeddings
    assert len(tensors) == 2 + 9 * cfg.num_hidden_layers
    for name, w in expected.items():
        t = tensors[name]
        got = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy()).reshape(w.shape)
        ours = w if w.dim() == 1 or fmt == "f32" else quantize(w, fmt).dequantize()
        assert t.tensor_type.name == ("F32" if w.dim() == 1 else fmt.upper())
        torch.testing.assert_close(got, ours, rtol=0, atol=0)


def test_llama_cpp_matches_our_decoder(tiny, tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp")
    path, _, tok = tiny
    out = to_gguf(path, tmp_path / "m.gguf", "f32")
    llm = llama_cpp.Llama(model_path=str(out), n_threads=2, n_ctx=128, verbose=False)
    ids = tok(PROMPT)["input_ids"]
    assert llm.tokenize(PROMPT.encode(), add_bos=False, special=False) == ids
    theirs = []
    for t in llm.generate(ids, temp=0.0, top_k=1):
        theirs.append(t)
        if len(theirs) == 24 or t == 1:
            break
    ours, _ = generate_ids(load_model(path), ids, max_new_tokens=24, stop_ids=(1,))
    assert ours == theirs


def test_export_errors(tiny, tmp_path):
    path = tiny[0]
    with pytest.raises(ValueError, match="fmt must be one of"):
        to_gguf(path, tmp_path / "x.gguf", "q2_k")
    with pytest.raises(ModelLoadError, match="does not exist"):
        to_gguf(tmp_path / "nothing", tmp_path / "x.gguf", "f32")
