"""The C++ decode step (pyengine/infer/decode_step.py, csrc/decode.h) against the torch path
of LlamaDecoder.forward, its spec.

Tolerance: both paths quantize the same fp32 activations to int8 before every GEMV and run
the same integer kernel, so they differ only by fp32 rounding order in rmsnorm, RoPE,
softmax and the attention sums (a few ulp; measured <= 3e-7 of max|logit| here).  So at
least 90% of the positions must be within 1e-5 * max|logit|.  The rest: an ulp can flip one
activation's int8 rounding at a .5 boundary (one quantum, 1/127 of its block's absmax;
measured 2e-3 of max|logit| once in 40 positions), so every position is within 1e-2.  A
wrong RoPE pair, kv head, attended range or a missing bias moves every position past 0 by
O(1) of the logits.
"""
import pytest
import torch

from pyengine.infer import LlamaDecoder, load_model
from pyengine.infer.decode_step import from_decoder
from pyengine import _ext
from tests.conftest import ISAS, num_threads, requires_ext
from tests.tiny_llama import save_tiny_model

pytestmark = requires_ext
STEPS, PROMPT = 40, [5, 17, 3, 42, 9, 11]
CONFIGS = {
    # GQA (2 query heads per kv head), head_dim 32, tied head, vocab 333: ragged row counts
    "llama_gqa_d32": ("LlamaConfig", dict(hidden_size=128, intermediate_size=192,
                                          num_attention_heads=4, num_key_value_heads=2,
                                          vocab_size=333)),
    # Qwen2: q/k/v biases, head_dim 64, 3 query heads per kv head, untied head
    "qwen2_bias_d64": ("Qwen2Config", dict(hidden_size=192, intermediate_size=128,
                                           num_attention_heads=3, num_key_value_heads=1,
                                           vocab_size=300, tie_word_embeddings=False)),
}


@pytest.fixture(scope="module", params=list(CONFIGS))
def model_dir(request, tmp_path_factory):
    """A tiny random model whose norms and biases are random too (HF inits them to 1 / 0)."""
    cls, overrides = CONFIGS[request.param]
    path = tmp_path_factory.mktemp(request.param)
    model, _ = save_tiny_model(path, config_cls=cls, seed=3, **overrides)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=gen))
            elif "norm" in name:
                p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
    model.save_pretrained(path)
    return path


def greedy(model, steps=STEPS):
    """Prefill PROMPT (torch path), then `steps` one-token forwards: (logits, tokens)."""
    logits = model.forward(torch.tensor(PROMPT), 0)
    out_logits, tokens = [], []
    for pos in range(len(PROMPT), len(PROMPT) + steps):
        token = int(logits.argmax())
        tokens.append(token)
        logits = model.forward(torch.tensor([token]), pos)
        out_logits.append(logits)
    return torch.stack(out_logits), tokens


def assert_close_logits(got, want):
    """[steps, V] logits within the tolerance of the module doc."""
    err = (got - want).abs().amax(1) / want.abs().amax(1)
    assert (err <= 1e-5).float().mean() >= 0.9, f"relative logit errors {err}"
    assert err.max() <= 1e-2, f"max relative logit error {err.max():.2e} at step {err.argmax()}"


@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.bfloat16], ids=["kv_fp32", "kv_bf16"])
@pytest.mark.parametrize("fmt", ["q8_0", "q4_0", "nf4"])
def test_step_logits_equal_the_torch_path(model_dir, fmt, kv_dtype, one_thread):
    step, torch_path = (LlamaDecoder.from_pretrained(model_dir, quant=fmt, max_len=64,
                                                     kv_dtype=kv_dtype) for _ in range(2))
    assert step.kv_cache.dtype == torch_path.kv_cache.dtype == kv_dtype
    torch_path.c_step = False
    got, got_tokens = greedy(step)
    assert step._step, "the C++ step was not used"
    want, want_tokens = greedy(torch_path)
    assert got_tokens == want_tokens
    assert_close_logits(got, want)
    # the k, v the step wrote are the torch path's (to their fp32 rounding, then kv_dtype's)
    end = len(PROMPT) + STEPS
    torch.testing.assert_close(step.kv_cache[..., :end, :].float(),
                               torch_path.kv_cache[..., :end, :].float(), rtol=1e-2, atol=1e-5)


def test_same_bits_on_one_and_two_threads(model_dir):
    runs = []
    for n in (1, 2):
        with num_threads(n):
            model = load_model(model_dir, quant="q8_0", max_len=64)
            runs.append(greedy(model, steps=12)[0])
    assert torch.equal(runs[0], runs[1])


def test_every_isa_agrees(model_dir, restore_isa, one_thread):
    """Per ISA (GEMVs: the same integers and fp32 operations; attention: vectorized by the
    compiler per ISA, so the last bits may differ): the same tokens, logits as above."""
    runs = []
    for isa in ISAS[:ISAS.index(_ext._C.best_isa()) + 1]:
        _ext._C.set_isa_cap(isa)
        runs.append(greedy(load_model(model_dir, quant="q4_0", max_len=64), steps=10))
    for logits, tokens in runs[:-1]:
        assert tokens == runs[-1][1]
        assert_close_logits(logits, runs[-1][0])


def test_kv_cache_defaults_and_bad_kv_dtype(model_dir):
    assert load_model(model_dir, quant="q4_0", max_len=8).kv_cache.dtype == torch.bfloat16
    assert load_model(model_dir, max_len=8).kv_cache.dtype == torch.float32
    with pytest.raises(ValueError, match="kv_dtype must be float32 or bfloat16, got torch.float16"):
        LlamaDecoder.from_pretrained(model_dir, max_len=8, kv_dtype=torch.float16)


def test_cache_full_and_bad_token_are_clear_errors(model_dir, one_thread):
    model = load_model(model_dir, quant="q8_0", max_len=8)
    model.forward(torch.tensor(PROMPT), 0)
    step = from_decoder(model)
    vocab = model.cfg.vocab
    with pytest.raises(ValueError, match=r"position 8 outside the KV cache \[0, 8\)"):
        step(3, 8)
    with pytest.raises(ValueError, match=rf"token id {vocab} outside the vocabulary \[0, {vocab}\)"):
        step(vocab, 6)
    with pytest.raises(ValueError, match=r"position 9 exceeds the KV cache \(8\)"):
        model.forward(torch.tensor([3]), 8)


def test_torch_path_when_a_linear_stays_fp32(tmp_path, one_thread):
    """K = 40 (no multiple of 32): down stays fp32, so no step; decoding still works."""
    save_tiny_model(tmp_path, seed=2, intermediate_size=40)
    model = load_model(tmp_path, quant="q8_0", max_len=16)
    assert from_decoder(model) is None
    model.forward(torch.tensor([3]), 0)
    assert model._step is False
