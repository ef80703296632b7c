"""pyengine.infer: the decoder against transformers on tiny random Llama/Qwen2 models, sampling,
adapter merge, the CLI, and clear errors."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pyengine.infer import ModelLoadError, generate, generate_ids, load_model, sample_next
from pyengine.nn.quant import QuantLinear
from tests.tiny_llama import save_tiny_model

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_llama")
    model, tok = save_tiny_model(path)
    return path, model, tok


PROMPT = "hello world, the quick"


def hf_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


def test_greedy_equals_transformers_generate(tiny):
    path, hf, tok = tiny
    ids = tok(PROMPT)["input_ids"]
    expected = hf.generate(torch.tensor([ids]), max_new_tokens=40, do_sample=False)[0, len(ids):]
    ours, stats = generate_ids(load_model(path), ids, max_new_tokens=40, stop_ids=(1,))
    assert ours == expected.tolist()
    assert stats.new_tokens == len(ours) and stats.prompt_tokens == len(ids)


def test_chunked_prefill_and_decode_logits_match_transformers(tiny):
    path, hf, tok = tiny
    ids = tok(PROMPT + " jumps over")["input_ids"]
    ref = hf_logits(hf, ids)
    model = load_model(path, max_len=4)  # reserve() grows it
    model.reserve(len(ids))
    got = torch.cat([model.forward(torch.tensor(ids[:5]), 0, all_logits=True),
                     model.forward(torch.tensor(ids[5:7]), 5, all_logits=True),
                     model.forward(torch.tensor(ids[7:8]), 7, all_logits=True),
                     model.forward(torch.tensor(ids[8:]), 8, all_logits=True)])
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("config_cls,overrides", [
    ("Qwen2Config", dict(tie_word_embeddings=False)),  # q/k/v biases, untied head
    ("LlamaConfig", dict(rope_parameters=dict(rope_type="llama3", rope_theta=500.0, factor=8.0,
                                              low_freq_factor=1.0, high_freq_factor=4.0,
                                              original_max_position_embeddings=16))),
    ("MistralConfig", dict(num_key_value_heads=1, head_dim=24)),
])
def test_other_llama_family_configs(tmp_path, config_cls, overrides):
    hf, tok = save_tiny_model(tmp_path, config_cls, seed=1, **overrides)
    ids = tok(PROMPT + " over the lazy dog and more words")["input_ids"]
    got = load_model(tmp_path).forward(torch.tensor(ids), 0, all_logits=True)
    torch.testing.assert_close(got, hf_logits(hf, ids), rtol=1e-4, atol=1e-4)


def test_bf16_logits_close_to_fp32(tiny):
    path, hf, tok = tiny
    ids = tok(PROMPT)["input_ids"]
    ref = hf_logits(hf, ids)
    got = load_model(path, dtype=torch.bfloat16).forward(torch.tensor(ids), 0, all_logits=True)
    assert got.dtype == torch.float32
    assert (got - ref).abs().max() < 0.05 * ref.abs().max()


def test_sampling_is_seeded_and_top_p_narrows(tiny):
    path, _, tok = tiny
    model = load_model(path)
    run = lambda **kw: generate(model, tok, PROMPT, max_new_tokens=24, **kw)
    a, b = run(temperature=1.5, seed=7), run(temperature=1.5, seed=7)
    assert a == b
    assert run(temperature=1.5, seed=8) != a
    # a nucleus that holds only the top token is greedy decoding
    assert run(temperature=1.0, top_p=1e-6, seed=3) == run(temperature=0.0)


def test_sample_next_top_p_keeps_the_nucleus():
    logits = torch.log(torch.tensor([0.05, 0.5, 0.3, 0.15]))
    gen = torch.Generator().manual_seed(0)
    picks = {sample_next(logits, 1.0, 0.7, gen) for _ in range(200)}
    assert picks == {1, 2}  # 0.5 + 0.3 reaches 0.7; 0.15 and 0.05 are cut


def test_stream_pieces_join_to_the_returned_text(tiny):
    path, _, tok = tiny
    pieces = []
    stats = []
    text = generate(load_model(path), tok, "café", max_new_tokens=30, temperature=1.0, seed=1,
                    stream=pieces.append, report=stats.append)
    assert "".join(pieces) == text and len(pieces) > 1
    assert stats[0].decode_tokens_per_s > 0


def _save_peft_adapter(path, hf, use_rslora):
    peft = pytest.importorskip("peft")
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                          use_rslora=use_rslora)
    lora = peft.get_peft_model(hf, cfg)
    torch.manual_seed(5)
    for name, p in lora.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.3)
    lora.save_pretrained(path)
    return lora


@pytest.mark.parametrize("use_rslora", [False, True])
def test_adapter_merge_matches_peft(tmp_path, use_rslora):
    hf, tok = save_tiny_model(tmp_path / "base", seed=2)
    lora = _save_peft_adapter(tmp_path / "adapter", hf, use_rslora)
    ids = tok(PROMPT)["input_ids"]
    with torch.no_grad():
        ref = lora(input_ids=torch.tensor([ids])).logits[0]
    got = load_model(tmp_path / "base", adapter=tmp_path / "adapter").forward(
        torch.tensor(ids), 0, all_logits=True)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(got, load_model(tmp_path / "base").forward(
        torch.tensor(ids), 0, all_logits=True), atol=1e-3)


@pytest.mark.parametrize("fmt,bound", [("q8_0", 0.1), ("q4_0", 1.0)])
def test_quantized_first_step_logits_close(tiny, monkeypatch, fmt, bound):
    """First-step logits: the kernel path vs the exact dequantized weights (ref backend) is
    tight; both vs fp32 by the format's error (this random tiny model amplifies it)."""
    path, hf, tok = tiny
    ids = torch.tensor(tok(PROMPT)["input_ids"])
    fp32 = load_model(path).forward(ids, 0)
    quant = load_model(path, quant=fmt).forward(ids, 0)
    monkeypatch.setenv("PYENGINE_BACKEND", "ref")
    exact = load_model(path, quant=fmt).forward(ids, 0)
    scale = fp32.abs().max()
    assert (quant - exact).abs().max() < 0.03 * scale
    assert (exact - fp32).abs().max() < bound * scale
    if fmt == "q8_0":
        assert set(quant.topk(3).indices.tolist()) == set(fp32.topk(3).indices.tolist())


def run_cli(*args):
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "pyengine.infer", *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=120)


def test_cli_end_to_end(tiny, tmp_path):
    path, _, tok = tiny
    prompt_file = tmp_path / "prompt.txt"
    prompt_file.write_text(PROMPT)
    res = run_cli("--model", path, "--prompt-file", prompt_file, "--max-new-tokens", 12)
    assert res.returncode == 0, res.stderr
    expected = generate(load_model(path), tok, PROMPT, max_new_tokens=12)
    assert res.stdout.rstrip("\n") == expected
    assert "decode:" in res.stderr and "tokens/s" in res.stderr
    chat = run_cli("--model", path, "--prompt", "hi", "--chat", "--max-new-tokens", 4,
                   "--temperature", 0.7, "--top-p", 0.9, "--seed", 1)
    assert chat.returncode == 0, chat.stderr


def cli_error(capsys, *args) -> str:
    """Run the CLI in-process; it must fail with exit code 2. Returns stderr."""
    from pyengine.infer.__main__ import main
    try:
        code = main([str(a) for a in args])
    except SystemExit as e:  # argparse
        code = e.code
    assert code == 2
    return capsys.readouterr().err


def test_cli_errors_are_clear(tiny, tmp_path, capsys):
    path = tiny[0]
    assert "does not exist" in cli_error(capsys, "--model", tmp_path / "missing", "--prompt", "x")
    assert "invalid choice" in cli_error(capsys, "--model", path, "--prompt", "x", "--quant", "q3")
    assert "--temperature" in cli_error(capsys, "--model", path, "--prompt", "x", "--temperature", -1)
    assert "--prompt" in cli_error(capsys, "--model", path)
    assert "--prompt-file" in cli_error(capsys, "--model", path, "--prompt-file", tmp_path / "no.txt")
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9")
    assert f"--prompt-file {tmp_path / 'latin1.txt'}: cannot read it as UTF-8 text" in cli_error(
        capsys, "--model", path, "--prompt-file", tmp_path / "latin1.txt")
    assert "adapter_config.json not found" in cli_error(
        capsys, "--model", path, "--prompt", "x", "--adapter", tmp_path)


def test_load_errors_are_clear(tiny, tmp_path):
    path = tiny[0]
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "config.json").write_text((path / "config.json").read_text())
    with pytest.raises(ModelLoadError, match="no model.safetensors"):
        load_model(corrupt)
    (corrupt / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ModelLoadError, match="cannot read safetensors"):
        load_model(corrupt)
    cfg = json.loads((path / "config.json").read_text())
    (corrupt / "config.json").write_text(json.dumps(dict(cfg, model_type="gpt2")))
    with pytest.raises(ModelLoadError, match="unsupported architecture model_type='gpt2'"):
        load_model(corrupt)
    (corrupt / "config.json").write_text(json.dumps(dict(
        cfg, rope_parameters=dict(rope_type="yarn", rope_theta=500.0, factor=4.0))))
    with pytest.raises(ModelLoadError, match="unsupported rope scaling type 'yarn'"):
        load_model(corrupt)
    with pytest.raises(ValueError, match="quant must be one of"):
        load_model(path, quant="int3")
    with pytest.raises(ModelLoadError, match="adapter_config.json not found"):
        load_model(path, adapter=tmp_path)
    model = load_model(path, max_len=8)
    with pytest.raises(ValueError, match="exceeds the KV cache"):
        model.forward(torch.arange(9), 0)


def test_context_limits_are_errors(tiny, capsys):
    """max_position_embeddings is 256: prompt + new tokens beyond it is refused up front."""
    path, _, tok = tiny
    n = len(tok(PROMPT)["input_ids"])
    err = cli_error(capsys, "--model", path, "--prompt", PROMPT, "--max-new-tokens", 257 - n)
    assert err == (f"error: the prompt ({n} tokens) + max_new_tokens ({257 - n}) = 257 exceeds the "
                   f"model's context of 256 tokens (max_position_embeddings); use max_new_tokens "
                   f"<= {256 - n}\n")
    long_prompt = " ".join(["hello world"] * 200)
    assert "; shorten the prompt" in cli_error(capsys, "--model", path, "--prompt", long_prompt)
    ids, _ = generate_ids(load_model(path), list(range(2, 2 + n)), max_new_tokens=256 - n)
    assert len(ids) <= 256 - n  # exactly filling the context is allowed


def test_cli_model_path_and_tokenizer_errors(tiny, tmp_path, capsys):
    path = tiny[0]
    err = cli_error(capsys, "--model", path / "config.json", "--prompt", "x")
    assert err == (f"error: {path / 'config.json'} is a file: pass the model directory {path} "
                   "(the one holding config.json)\n")
    bare = tmp_path / "no_tokenizer"
    bare.mkdir()
    for f in ("config.json", "model.safetensors"):
        (bare / f).write_bytes((path / f).read_bytes())
    err = cli_error(capsys, "--model", bare, "--prompt", "x")
    assert err == (f"error: model directory {bare} has no tokenizer files (one of tokenizer.json, "
                   "tokenizer.model, vocab.json, vocab.txt, spiece.model, sentencepiece.bpe.model, "
                   "tokenizer.tiktoken); save the tokenizer there too\n")


def test_cli_ctrl_c_exits_130_without_traceback(tiny, capsys, monkeypatch):
    from pyengine.infer import __main__ as cli
    real = cli.generate

    def interrupted(*args, **kwargs):  # Ctrl-C arrives while tokens are streaming
        def stop(stats):
            raise KeyboardInterrupt
        return real(*args, **{**kwargs, "report": stop})
    monkeypatch.setattr(cli, "generate", interrupted)
    try:
        code = cli.main(["--model", str(tiny[0]), "--prompt", PROMPT, "--max-new-tokens", "3"])
    except KeyboardInterrupt:
        pytest.fail("KeyboardInterrupt escaped main() (a traceback for the user)")
    assert code == 130
    assert capsys.readouterr().err == "\ninterrupted\n"


def test_cli_closed_stdout_exits_quietly(tiny):
    """`infer ... | head`: the reader closes the pipe; no traceback, exit 141 (as SIGPIPE)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "pyengine.infer", "--model", str(tiny[0]),
                             "--prompt", PROMPT, "--max-new-tokens", "40"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    proc.stdout.close()  # before the first token is written
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141
    assert "Traceback" not in err and "Error" not in err, err


def test_quantized_layers_with_ragged_k_stay_fp32(tmp_path, caplog):
    """intermediate 40: down_proj's K is no multiple of 32 -> kept fp32 with one warning per
    tensor, exactly the checkpoint's weight; the other layers are quantized."""
    hf, tok = save_tiny_model(tmp_path, seed=2, intermediate_size=40)
    with caplog.at_level("WARNING", logger="pyengine"):
        model = load_model(tmp_path, quant="q8_0")
    assert [r.getMessage() for r in caplog.records] == [
        f"model.layers.{i}.mlp.down_proj.weight kept in fp32: in_features 40 is not a multiple "
        "of the q8_0 block (32)" for i in range(2)]
    sd = hf.state_dict()
    for i, layer in enumerate(model.layers):
        assert type(layer.down) is torch.nn.Linear
        assert torch.equal(layer.down.weight, sd[f"model.layers.{i}.mlp.down_proj.weight"])
        assert isinstance(layer.gate_up, QuantLinear) and layer.gate_up.fmt == "q8_0"
    ids = torch.tensor(tok(PROMPT)["input_ids"])
    fp32 = load_model(tmp_path).forward(ids, 0)
    assert (model.forward(ids, 0) - fp32).abs().max() < 0.1 * fp32.abs().max()


@pytest.mark.parametrize("threads", [1, 2])
def test_cli_threads_sets_the_count_generation_runs_with(tiny, monkeypatch, capsys, threads):
    """--threads N: torch (and so pyengine's kernels) run generation on N threads."""
    from pyengine.infer import __main__ as cli
    seen = []
    monkeypatch.setattr(cli, "generate", lambda *a, **k: seen.append(torch.get_num_threads()))
    before = torch.get_num_threads()
    try:
        assert cli.main(["--model", str(tiny[0]), "--prompt", PROMPT, "--threads",
                         str(threads)]) == 0
    finally:
        torch.set_num_threads(before)
    assert seen == [threads]
    assert "must be >= 1" in cli_error(capsys, "--model", tiny[0], "--prompt", "x",
                                       "--threads", 0)
