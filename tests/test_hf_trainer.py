"""pyengine inside transformers.Trainer and trl.SFTTrainer on a tiny Llama (bf16 autocast
and fp32, a few steps, gradient accumulation 2 over ragged lengths, so
num_items_in_batch matters): a PEFT LoRA model patched by pyengine gives the per-step
losses and trained adapters of the unpatched run (fp32: to rounding; bf16: within the
bf16-vs-fp32 difference of the unpatched run itself), and an `apply_lora` model trains
under either trainer's bf16 like the PEFT model with the same adapters."""
import pytest
import torch

datasets = pytest.importorskip("datasets")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
trl = pytest.importorskip("trl")

import pyengine  # noqa: E402
from pyengine.lora import apply_lora, load_adapter  # noqa: E402
from tests.tiny_llama import TEXTS, save_tiny_model  # noqa: E402

STEPS = 3
# ragged: lengths from 2 to ~40 tokens, so padding and the token count per micro-batch vary
TEXTS_RAGGED = [" ".join(TEXTS[i % 4].split()[: 1 + (3 * i) % 9]) * (1 + i % 3)
                for i in range(4 * STEPS)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_llama")
    _, tok = save_tiny_model(path, initializer_range=0.05)
    tok.pad_token = tok.eos_token
    return path, tok


def lora_config(**kw):
    return peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", **kw)


def peft_model(path):
    torch.manual_seed(0)
    base = transformers.AutoModelForCausalLM.from_pretrained(path)
    return peft.get_peft_model(base, lora_config(task_type="CAUSAL_LM"))


def train(kind, model, tok, out, bf16, patch_built=False):
    """Per-step training losses of STEPS optimizer steps (batch 2, grad accumulation 2);
    patch_built: pyengine.patch(trainer.model) after the trainer is built."""
    common = dict(output_dir=str(out), max_steps=STEPS, per_device_train_batch_size=2,
                  gradient_accumulation_steps=2, learning_rate=5e-3, logging_steps=1,
                  report_to="none", save_strategy="no", use_cpu=True, bf16=bf16, seed=7,
                  disable_tqdm=True, dataloader_num_workers=0)
    data = datasets.Dataset.from_list([{"text": t} for t in TEXTS_RAGGED])
    if kind == "sft":
        trainer = trl.SFTTrainer(model=model, args=trl.SFTConfig(**common), train_dataset=data,
                                 processing_class=tok)
    else:
        data = data.map(lambda e: tok(e["text"]), remove_columns=["text"])
        trainer = transformers.Trainer(
            model=model, args=transformers.TrainingArguments(**common), train_dataset=data,
            data_collator=transformers.DataCollatorForLanguageModeling(tok, mlm=False))
    if patch_built:
        pyengine.patch(trainer.model)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == STEPS
    return torch.tensor(losses, dtype=torch.float64)


def adapters(model):
    """{module path: (A, B)} of every LoRA layer, PEFT's or pyengine's names alike."""
    out = {}
    for name, p in model.named_parameters():
        if ".lora_A." in name or ".lora_B." in name:
            path = name.removeprefix("base_model.model.").split(".lora_")[0]
            out.setdefault(path, {})[name.split(".lora_")[1][0]] = p.detach().double()
    return out


def assert_within_bf16_noise(got, plain, fp32):
    """Per step, |got - fp32| <= 2 |plain - fp32| + max |plain - fp32|: the patched bf16 run
    is as close to the fp32 run as the unpatched bf16 run is (conftest's torch-error rule,
    with the fp32 run as the reference)."""
    err, plain_err = (got - fp32).abs(), (plain - fp32).abs()
    assert (err <= 2 * plain_err + plain_err.max()).all(), (got, plain, fp32)


@pytest.fixture(scope="module")
def peft_run(tiny, tmp_path_factory):
    """run(kind, bf16) -> (per-step losses, trained adapters) of the unpatched PEFT model,
    trained once per (kind, bf16) for the whole module."""
    path, tok = tiny
    cache = {}

    def run(kind, bf16):
        if (kind, bf16) not in cache:
            model = peft_model(path)
            losses = train(kind, model, tok, tmp_path_factory.mktemp("peft"), bf16)
            cache[kind, bf16] = losses, adapters(model)
        return cache[kind, bf16]
    return run


@pytest.mark.parametrize("kind", ["trainer", "sft"])
@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_patched_peft_model_trains_like_peft(tiny, peft_run, tmp_path, kind, bf16):
    path, tok = tiny
    want, want_w = peft_run(kind, bf16)
    ours = pyengine.patch(peft_model(path))
    got = train(kind, ours, tok, tmp_path, bf16)
    got_w = adapters(ours)
    assert got_w.keys() == want_w.keys() and len(got_w) == 14
    if not bf16:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=0)
        for k in want_w:
            for ab in "AB":
                torch.testing.assert_close(got_w[k][ab], want_w[k][ab], rtol=1e-4, atol=1e-6)
        return
    assert_within_bf16_noise(got, want, peft_run(kind, False)[0])


@pytest.mark.parametrize("kind", ["trainer", "sft"])
def test_apply_lora_model_trains_under_trainer_bf16(tiny, peft_run, tmp_path, kind):
    """The new user's path: apply_lora, then the trainer with bf16 (TRL's default); the same
    losses as the PEFT model holding the same (initial) adapters."""
    path, tok = tiny
    peft_model(path).save_pretrained(tmp_path / "adapter")
    model = transformers.AutoModelForCausalLM.from_pretrained(path)
    load_adapter(apply_lora(model, r=4, alpha=8), tmp_path / "adapter")
    got = train(kind, model, tok, tmp_path / "out", True)
    want, want_w = peft_run(kind, True)
    assert_within_bf16_noise(got, want, peft_run(kind, False)[0])
    assert adapters(model).keys() == want_w.keys()


def test_patch_after_sft_trainer_keeps_trls_fused_head(tiny, peft_run, tmp_path):
    """SFTTrainer binds its own fused LM-head forward on the model it builds; patching
    trainer.model afterwards keeps it (replacing it broke TRL's loss: no log_probs) and
    still runs the layers on pyengine's kernels."""
    path, tok = tiny
    model = peft_model(path)
    got = train("sft", model, tok, tmp_path, False, patch_built=True)
    torch.testing.assert_close(got, peft_run("sft", False)[0], rtol=1e-5, atol=0)
    inner = model.get_base_model()
    trls = inner.__dict__["forward"].__func__  # (functools.wraps of HF's forward)
    assert trls.__wrapped__ is type(inner).forward and trls.__code__.co_filename.find("trl") > 0
    assert type(inner.model.norm).__module__ == "pyengine.nn.norms"
