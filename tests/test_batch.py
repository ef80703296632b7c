"""BatchDecoder (pyengine/infer/batch.py): several sequences per step in their own KV slots,
prefill chunks mixed with decode rows, per-row LoRA adapters without merging.

Specs: each sequence alone through LlamaDecoder.forward (its own one-slot cache), and for an
adapter the model loaded with that adapter merged (pyengine.infer --adapter).  fp32 weights:
the batch runs the same ops on the same numbers except for GEMM blocking over a different
row count and (with LoRA) W x + s B (A x) instead of (W + s B A) x, so logits agree to
~1e-6 of max|logit| (quantized weights: the same int8 kernel on activations that differ by
fp32 rounding, also ~1e-6 here); the tolerance 2e-5 * max|logit| fails on a wrong position,
slot, mask, RoPE row order or adapter (those move logits by O(1e-1) of max|logit| and more)."""
import pytest
import torch

from pyengine.infer import load_model
from pyengine.infer.batch import BatchDecoder, Chunk
from pyengine.infer.model import ModelLoadError
from tests.tiny_llama import save_tiny_model

SEQS = [[5, 17, 3, 42, 9, 11, 60], [7, 8], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]]
TOL = 2e-5


def _peft_adapter(path, hf, targets, seed, r=4):
    peft = pytest.importorskip("peft")
    cfg = peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets)
    lora = peft.get_peft_model(hf, cfg)
    g = torch.Generator().manual_seed(seed)
    for name, p in lora.named_parameters():
        if "lora_" in name:
            p.data = torch.randn(p.shape, generator=g) * 0.3
    lora.save_pretrained(path)
    lora.unload()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """GQA llama (4 heads / 2 kv, head_dim 32) with two adapters of different targets/ranks."""
    root = tmp_path_factory.mktemp("batch")
    hf, _ = save_tiny_model(root / "base", seed=3, num_attention_heads=4, num_key_value_heads=2,
                            hidden_size=128, intermediate_size=192)
    _peft_adapter(root / "a0", hf, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                    "up_proj", "down_proj"], seed=1, r=4)
    _peft_adapter(root / "a1", hf, ["k_proj", "up_proj"], seed=2, r=8)
    return root


def _alone(root, seq, quant="none", adapter=None):
    """All-position logits of `seq` run alone (torch path, its own cache)."""
    model = load_model(root / "base", quant=quant, adapter=adapter, max_len=64)
    model.c_step = False
    return model.forward(torch.tensor(seq), 0, all_logits=True)


def _close(got, want):
    err = (got - want).abs().max() / want.abs().max()
    assert err <= TOL, f"max error {err:.2e} of max|logit|"


@pytest.mark.parametrize("quant", ["none", "q8_0"])
def test_chunks_of_three_slots_equal_each_sequence_alone(tiny, quant):
    engine = BatchDecoder(load_model(tiny / "base", quant=quant, max_len=64), slots=4, max_len=64)
    want = [_alone(tiny, s, quant) for s in SEQS]
    # slot 3, 0, 2: sequence 0 in 2 chunks, 1 in 2 one-token steps, 2 in chunks of 4, 1, 6
    plan = [[(3, 0, 0, 4), (0, 1, 0, 1), (2, 2, 0, 4)],
            [(3, 0, 4, 7), (0, 1, 1, 2), (2, 2, 4, 5)],
            [(2, 2, 5, 11)]]
    for step in plan:
        out = engine.step([Chunk(slot, a, SEQS[s][a:b]) for slot, s, a, b in step])
        for row, (_, s, _, b) in zip(out, step):
            _close(row, want[s][b - 1])


def test_a_slot_reused_from_position_0_forgets_the_old_sequence(tiny):
    engine = BatchDecoder(load_model(tiny / "base", max_len=64), slots=1, max_len=64)
    engine.step([Chunk(0, 0, SEQS[2])])
    _close(engine.step([Chunk(0, 0, SEQS[1])])[0], _alone(tiny, SEQS[1])[-1])


def test_per_row_adapters_equal_the_merged_models(tiny):
    engine = BatchDecoder(load_model(tiny / "base", max_len=64), slots=3, max_len=64)
    engine.add_adapter("a0", tiny / "a0")
    engine.add_adapter("a1", tiny / "a1")
    assert engine.adapter_names == ["a0", "a1"]
    names = ["a1", None, "a0"]
    out = engine.step([Chunk(i, 0, SEQS[0], adapter=n) for i, n in enumerate(names)])
    wants = [_alone(tiny, SEQS[0], adapter=None if n is None else tiny / n)[-1] for n in names]
    for got, want in zip(out, wants):
        _close(got, want)
    assert (wants[0] - wants[1]).abs().max() > 0.05 * wants[1].abs().max()  # the adapters matter
    # decode steps continue with each row's adapter
    out = engine.step([Chunk(i, len(SEQS[0]), [3], adapter=n) for i, n in enumerate(names)])
    for got, n in zip(out, names):
        _close(got, _alone(tiny, SEQS[0] + [3], adapter=None if n is None else tiny / n)[-1])


def test_removing_an_adapter_keeps_the_others(tiny):
    engine = BatchDecoder(load_model(tiny / "base", max_len=64), slots=1, max_len=64)
    engine.add_adapter("a0", tiny / "a0")
    engine.add_adapter("a1", tiny / "a1")
    engine.remove_adapter("a0")
    assert engine.adapter_names == ["a1"]
    _close(engine.step([Chunk(0, 0, SEQS[1], adapter="a1")])[0],
           _alone(tiny, SEQS[1], adapter=tiny / "a1")[-1])
    with pytest.raises(KeyError, match="'a0' is not loaded"):
        engine.step([Chunk(0, 0, SEQS[1], adapter="a0")])
    with pytest.raises(KeyError):
        engine.remove_adapter("a0")
    with pytest.raises(ValueError, match="'a1' is already loaded"):
        engine.add_adapter("a1", tiny / "a1")


def test_bad_chunks_and_adapters_are_refused(tiny, tmp_path):
    engine = BatchDecoder(load_model(tiny / "base", max_len=16), slots=2, max_len=16, max_rows=8)
    for chunks, msg in [([], "no chunks"),
                        ([Chunk(2, 0, [1])], r"slot 2 outside \[0, 2\)"),
                        ([Chunk(0, 0, [1]), Chunk(0, 1, [2])], "slot 0 appears twice"),
                        ([Chunk(0, 15, [1, 2])], r"2 tokens at 15 must be 1\+ tokens within the KV cache \[0, 16\)"),
                        ([Chunk(0, 0, [])], "0 tokens"),
                        ([Chunk(0, 0, [1, 999999])], r"token id 999999 outside the vocabulary"),
                        ([Chunk(0, 0, list(range(9)))], "9 tokens exceed max_rows 8")]:
        with pytest.raises(ValueError, match=msg):
            engine.step(chunks)
    with pytest.raises(ModelLoadError, match="adapter_config.json not found"):
        engine.add_adapter("x", tmp_path)
    assert engine.adapter_names == []
