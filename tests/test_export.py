"""pyengine.export: the GGUF read back with gguf.GGUFReader holds exactly the expected tensors
(names, shapes, types, values: pyengine.quant's blocks bit for bit, q/k in llama.cpp's rope
order) and metadata (every key and value), for a tied and an untied head, llama3 rope scaling
and GQA; the CLI's errors; llama.cpp (when llama-cpp-python is installed) computes our logits."""
import json
import math
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
from pyengine.export import main as export_main, to_gguf  # noqa: E402
from pyengine.infer import load_model  # noqa: E402
from pyengine.infer.model import interleave_rope_rows  # noqa: E402
from pyengine.quant import quantize  # noqa: E402
from tests.tiny_llama import save_tiny_model  # noqa: E402

PROMPT = "hello world, the quick"
LLAMA3 = dict(rope_type="llama3", rope_theta=500.0, factor=8.0, low_freq_factor=1.0,
              high_freq_factor=4.0, original_max_position_embeddings=16)
MODELS = {  # tied head, 2 kv heads for 4; untied head, llama3 rope, 1 kv head, K=40 in ffn_down
    "tied": dict(),
    "untied_llama3": dict(tie_word_embeddings=False, num_key_value_heads=1, intermediate_size=40,
                          rope_parameters=LLAMA3),
}


@pytest.fixture(scope="module", params=sorted(MODELS))
def tiny(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    hf, tok = save_tiny_model(path, seed=3, **MODELS[request.param])
    return path, hf, tok


def llama3_rope_factors(head_dim, theta, factor, low, high, old_len):
    """llama.cpp's rope_freqs for llama3 scaling: how much slower each frequency turns."""
    out = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi * theta ** (i / head_dim)
        if wavelen < old_len / high:
            out.append(1.0)
        elif wavelen > old_len / low:
            out.append(factor)
        else:
            smooth = (old_len / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(out)


def expected_tensors(hf):
    """{gguf name: weight in llama.cpp's orientation} for a transformers Llama."""
    cfg, sd = hf.config, hf.state_dict()
    out = {"token_embd.weight": sd["model.embed_tokens.weight"], "output_norm.weight": sd["model.norm.weight"]}
    if not cfg.tie_word_embeddings:
        out["output.weight"] = sd["lm_head.weight"]
    rope = cfg.rope_parameters
    if rope.get("rope_type") == "llama3":
        out["rope_freqs.weight"] = llama3_rope_factors(
            cfg.head_dim, rope["rope_theta"], rope["factor"], rope["low_freq_factor"],
            rope["high_freq_factor"], rope["original_max_position_embeddings"])
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        out.update({
            f"blk.{i}.attn_norm.weight": sd[p + "input_layernorm.weight"],
            f"blk.{i}.ffn_norm.weight": sd[p + "post_attention_layernorm.weight"],
            f"blk.{i}.attn_q.weight": interleave_rope_rows(sd[p + "self_attn.q_proj.weight"],
                                                          cfg.num_attention_heads),
            f"blk.{i}.attn_k.weight": interleave_rope_rows(sd[p + "self_attn.k_proj.weight"],
                                                          cfg.num_key_value_heads),
            f"blk.{i}.attn_v.weight": sd[p + "self_attn.v_proj.weight"],
            f"blk.{i}.attn_output.weight": sd[p + "self_attn.o_proj.weight"],
            f"blk.{i}.ffn_gate.weight": sd[p + "mlp.gate_proj.weight"],
            f"blk.{i}.ffn_up.weight": sd[p + "mlp.up_proj.weight"],
            f"blk.{i}.ffn_down.weight": sd[p + "mlp.down_proj.weight"]})
    return out


def expected_metadata(path, hf, tok, fmt):
    cfg = hf.config
    spec = json.loads((path / "tokenizer.json").read_text())
    vocab = tok.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    types = [3 if t in ("<s>", "</s>") else 1 for t in tokens]  # CONTROL / NORMAL
    return {
        "GGUF.version": 3, "GGUF.tensor_count": len(expected_tensors(hf)), "GGUF.kv_count": 23,
        "general.architecture": "llama", "general.name": path.name,
        "general.file_type": {"f32": 0, "f16": 1, "bf16": 32, "q8_0": 7, "q4_0": 2}[fmt],
        "llama.context_length": 256, "llama.embedding_length": 64, "llama.block_count": 2,
        "llama.feed_forward_length": cfg.intermediate_size, "llama.attention.head_count": 4,
        "llama.attention.head_count_kv": cfg.num_key_value_heads, "llama.attention.key_length": 16,
        "llama.attention.value_length": 16, "llama.rope.dimension_count": 16,
        "llama.rope.freq_base": 500.0, "llama.attention.layer_norm_rms_epsilon": float(np.float32(1e-6)),
        "llama.vocab_size": len(tokens), "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2",
        "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": [" ".join(m) for m in spec["model"]["merges"]],
        "tokenizer.ggml.bos_token_id": 0, "tokenizer.ggml.eos_token_id": 1,
        "tokenizer.chat_template": tok.chat_template,
    }


@pytest.mark.parametrize("fmt", ["f32", "f16", "bf16", "q8_0", "q4_0"])
def test_gguf_holds_exactly_the_expected_tensors_and_metadata(tiny, tmp_path, fmt):
    path, hf, tok = tiny
    reader = gguf.GGUFReader(to_gguf(path, tmp_path / f"m-{fmt}.gguf", fmt))
    meta = {k: f.contents() for k, f in reader.fields.items()}
    assert meta == expected_metadata(path, hf, tok, fmt)
    want = expected_tensors(hf)
    assert [t.name for t in reader.tensors] == list(want)
    for t in reader.tensors:
        w = want[t.name]
        assert list(t.shape) == list(reversed(w.shape)), t.name  # ggml lists ne0 (row length) first
        got = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy()).reshape(w.shape)
        if fmt in ("f16", "bf16") and w.dim() == 2:  # every 2-D weight, rounded to nearest even
            assert t.tensor_type.name == fmt.upper(), t.name
            rounded = w.to(torch.float16 if fmt == "f16" else torch.bfloat16).float()
            torch.testing.assert_close(got, rounded, rtol=0, atol=0, msg=t.name)
            continue
        quantized = w.dim() == 2 and fmt != "f32" and w.shape[1] % 32 == 0
        assert t.tensor_type.name == (fmt.upper() if quantized else "F32"), t.name
        ours = quantize(w, fmt).dequantize() if quantized else w.float()
        torch.testing.assert_close(got, ours, rtol=0 if quantized else 1e-6, atol=0, msg=t.name)
        if quantized:  # the very bytes of pyengine's blocks
            assert np.array_equal(t.data.reshape(-1), quantize(w, fmt).gguf_blocks().numpy().reshape(-1))


def test_ragged_k_weights_stay_f32_with_a_warning(tmp_path, caplog):
    save_tiny_model(tmp_path / "m", seed=1, intermediate_size=40)
    with caplog.at_level("WARNING", logger="pyengine"):
        to_gguf(tmp_path / "m", tmp_path / "m.gguf", "q4_0")
    assert [r.getMessage() for r in caplog.records] == [
        f"GGUF export: blk.{i}.ffn_down.weight kept in F32: its rows (40) are not a multiple of "
        "the q4_0 block (32)" for i in range(2)]


def cli(capsys, *args):
    capsys.readouterr()
    code = export_main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.err


def test_cli_errors_exit_2_and_keep_files(tiny, tmp_path, capsys):
    path = tiny[0]
    out = tmp_path / "m.gguf"
    assert cli(capsys, tmp_path / "nothing", out) == (2, f"error: model directory {tmp_path / 'nothing'} "
                                                         "does not exist\n")
    (tmp_path / "empty").mkdir()
    assert cli(capsys, path, out, "--adapter", tmp_path / "empty") == (
        2, f"error: adapter: {tmp_path / 'empty' / 'adapter_config.json'} not found\n")
    assert cli(capsys, path, tmp_path) == (
        2, f"error: output {tmp_path} is a directory; give a file path such as {tmp_path / 'model.gguf'}\n")
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    code, err = cli(capsys, path, blocker / "m.gguf")  # the output's folder cannot be made
    assert code == 2 and err.startswith("error: ") and str(blocker) in err and "Traceback" not in err
    with pytest.raises(SystemExit) as e:
        export_main([str(path), str(out), "--fmt", "q2_k"])
    assert e.value.code == 2 and "invalid choice: 'q2_k'" in capsys.readouterr().err
    # an existing output is kept unless --force
    out.write_bytes(b"precious")
    assert cli(capsys, path, out, "--fmt", "f32") == (
        2, f"error: output {out} already exists (pass --force / overwrite=True to replace it)\n")
    assert out.read_bytes() == b"precious"
    assert cli(capsys, path, out, "--fmt", "f32", "--force") == (0, "")
    assert gguf.GGUFReader(out).fields["general.architecture"].contents() == "llama"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "empty", "m.gguf"]
    umask = os.umask(0o022)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask  # readable as any file the user makes
    inside = path / "model.safetensors"  # --force must not replace the model's own files
    before = inside.read_bytes()
    assert cli(capsys, path, inside, "--force") == (
        2, f"error: output {inside} is inside the input directory {path}; write the GGUF file "
           "elsewhere\n")
    assert inside.read_bytes() == before


def test_cli_refuses_other_architectures(tmp_path, capsys):
    save_tiny_model(tmp_path / "qwen3", "Qwen3Config", tie_word_embeddings=False)
    assert cli(capsys, tmp_path / "qwen3", tmp_path / "q.gguf") == (
        2, "error: unsupported architecture model_type='qwen3' (supported: llama, mistral, "
           "qwen2)\n")
    assert not (tmp_path / "q.gguf").exists()


@pytest.fixture(scope="module")
def tiny_qwen2(tmp_path_factory):
    """A Qwen2 with random (non-zero) q / k / v biases, so a dropped or misplaced one shows."""
    path = tmp_path_factory.mktemp("qwen2")
    # (a Qwen2 directory loads its tokenizer as Qwen2's class, which adds <|endoftext|>:
    # vocab rows to spare, as real Qwen2 checkpoints have)
    hf, tok = save_tiny_model(path, "Qwen2Config", seed=3, tie_word_embeddings=False,
                              vocab_size=336)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("_proj.bias"):
                p.normal_(0, 0.5)
    hf.save_pretrained(path)
    return path, hf, tok


def test_qwen2_gguf_keeps_hf_rows_and_biases(tiny_qwen2, tmp_path):
    path, hf, _ = tiny_qwen2
    reader = gguf.GGUFReader(to_gguf(path, tmp_path / "q.gguf", "f32"))
    assert reader.fields["general.architecture"].contents() == "qwen2"
    tensors = {t.name: torch.from_numpy(t.data.copy()) for t in reader.tensors}
    state = hf.state_dict()
    for i in range(hf.config.num_hidden_layers):
        for short, proj in (("attn_q", "q_proj"), ("attn_k", "k_proj"), ("attn_v", "v_proj")):
            for kind in ("weight", "bias"):
                want = state[f"model.layers.{i}.self_attn.{proj}.{kind}"]
                assert torch.equal(tensors[f"blk.{i}.{short}.{kind}"].reshape(want.shape), want)


def test_failed_write_leaves_no_file(tiny, tmp_path, capsys, monkeypatch):
    def disk_full(self, *args, **kwargs):
        self.fout[0].write(b"\0" * 100)  # part of the file is out when the disk fills up
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", disk_full)
    code, err = cli(capsys, tiny[0], tmp_path / "m.gguf")
    assert (code, err) == (2, "error: [Errno 28] No space left on device\n")
    assert list(tmp_path.iterdir()) == []


LLAMA_CPP_LOGITS = """
import sys, numpy as np, llama_cpp
model, out, ids = sys.argv[1], sys.argv[2], [int(i) for i in sys.argv[3:]]
llm = llama_cpp.Llama(model_path=model, n_ctx=64, n_threads=2, logits_all=True, verbose=False,
                      type_k=0, type_v=0, flash_attn=False)  # F32 KV cache, as ours
llm.eval(ids)
np.save(out, np.array(llm.scores[:len(ids)], dtype=np.float32))
"""


def skip_without_llama_cpp(reason: str):
    """Skipped where llama.cpp cannot run; `make test-llamacpp` (CI) sets
    PYENGINE_REQUIRE_LLAMA_CPP=1, which makes that a failure."""
    if os.environ.get("PYENGINE_REQUIRE_LLAMA_CPP") == "1":
        pytest.fail(reason)
    pytest.skip(reason)


def llama_cpp_logits(model, ids, out):
    """llama.cpp's logits [T, V] for `ids`, computed in a subprocess: a llama.cpp built for
    CPU features this machine does not enable (AMX in some VMs) dies with SIGILL there, not
    in the test process."""
    res = subprocess.run([sys.executable, "-c", LLAMA_CPP_LOGITS, str(model), str(out), *map(str, ids)],
                         capture_output=True, text=True, timeout=300)
    if res.returncode == -signal.SIGILL:
        skip_without_llama_cpp("llama.cpp died with SIGILL: built for a CPU feature this machine "
                               "does not enable (e.g. AMX in a VM); rebuild it with "
                               "CMAKE_ARGS=-DGGML_NATIVE=OFF (make test-llamacpp does)")
    assert res.returncode == 0, res.stderr[-2000:]
    return torch.from_numpy(np.load(out))


def test_llama_cpp_runs_our_qwen2_gguf(tiny_qwen2, tmp_path):
    """llama.cpp's qwen2 architecture on our export gives our (transformers-equal) logits."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        skip_without_llama_cpp("llama-cpp-python is not installed (make test-llamacpp builds it)")
    path, _, tok = tiny_qwen2
    ids = tok(PROMPT)["input_ids"]
    theirs = llama_cpp_logits(to_gguf(path, tmp_path / "q.gguf", "f32"), ids,
                              tmp_path / "logits.npy")
    fp32 = load_model(path).forward(torch.tensor(ids), 0, all_logits=True)
    assert (theirs - fp32).abs().max() <= 1e-5 * fp32.abs().max()


@pytest.mark.parametrize("fmt", ["f32", "f16", "bf16", "q8_0"])
def test_llama_cpp_logits_match_ours(tiny, tmp_path, fmt):
    """llama.cpp runs our GGUF and gets our decoder's logits: f32 to rounding, q8_0 within
    twice the error the format itself makes (llama.cpp also quantizes activations); f16 /
    bf16 (llama.cpp also rounds activations to them) within 0.2 / 0.6 of our q8_0's error
    (measured 0.05 / 0.29): a wrong layout or byte order gives unrelated logits."""
    try:
        import llama_cpp
    except ImportError:
        skip_without_llama_cpp("llama-cpp-python is not installed (make test-llamacpp builds it)")
    path, _, tok = tiny
    ids = tok(PROMPT)["input_ids"]
    out = to_gguf(path, tmp_path / f"{fmt}.gguf", fmt)
    llm = llama_cpp.Llama(model_path=str(out), vocab_only=True, verbose=False)
    assert llm.tokenize(PROMPT.encode(), add_bos=False, special=False) == ids
    theirs = llama_cpp_logits(out, ids, tmp_path / "logits.npy")
    fp32 = load_model(path).forward(torch.tensor(ids), 0, all_logits=True)
    if fmt == "f32":
        assert (theirs - fp32).abs().max() <= 1e-5 * fp32.abs().max()
    elif fmt in ("f16", "bf16"):
        q8 = load_model(path, quant="q8_0").forward(torch.tensor(ids), 0, all_logits=True)
        assert (theirs - fp32).abs().max() <= (0.6 if fmt == "bf16" else 0.2) * (q8 - fp32).abs().max()
    else:
        ours = load_model(path, quant=fmt).forward(torch.tensor(ids), 0, all_logits=True)
        assert (theirs - ours).abs().max() <= 2 * (ours - fp32).abs().max()
