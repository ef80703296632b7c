"""End-to-end fine-tuning on tiny Llama / BERT directories built from config (seconds each)."""
from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys

import pytest
import torch
import yaml

from pyengine.finetune import build_config, run
from pyengine.finetune import trainer as T
from pyengine.finetune.config import from_argv
from tests.conftest import num_threads
from tests.tiny_hf import make_llama, sentences, write_jsonl

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def text_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("text")
    rows = [{"text": r["text"]} for r in sentences(48)]
    return write_jsonl(d / "train.jsonl", rows), write_jsonl(d / "val.jsonl", rows[:16])


@pytest.fixture(scope="module")
def cls_data(tmp_path_factory):
    """Learnable by a random tiny BERT: the first word gives the class away."""
    d = tmp_path_factory.mktemp("cls")
    rows = [{"text": ("wonderful " if i % 2 else "terrible ") + r["text"],
             "label": "positive" if i % 2 else "negative"} for i, r in enumerate(sentences(128))]
    return write_jsonl(d / "train.jsonl", rows[:96]), write_jsonl(d / "val.jsonl", rows[96:128])


def causal(llama, text_data, out, **kw):
    cfg = dict(model=llama, data=text_data[0], eval_data=text_data[1], task="causal-lm",
               output=str(out), batch_size=4, max_steps=8, lr=3e-2, warmup_ratio=0.0,
               dtype="fp32", progress=False, log_every=2)
    cfg.update(kw)
    return cfg


def peft_model(base_dir, adapter_dir, auto):
    from peft import PeftModel
    base = auto.from_pretrained(base_dir, dtype=torch.float32)
    return PeftModel.from_pretrained(base, adapter_dir).eval()


def metrics_of(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_causal_lm_loss_decreases_and_outputs(llama, text_data, tmp_path):
    r = run(causal(llama, text_data, tmp_path / "out", max_steps=12, log_every=5))
    first, last = sum(r["losses"][:3]) / 3, sum(r["losses"][-3:]) / 3
    assert last < first - 0.2, r["losses"]
    assert r["eval_after"]["loss"] < r["eval_before"]["loss"]
    assert math.isclose(r["eval_after"]["perplexity"], math.exp(r["eval_after"]["loss"]))
    out = tmp_path / "out"
    for name in ("adapter_config.json", "adapter_model.safetensors", "config.yaml",
                 "metrics.jsonl", "eval.json", "loss.png"):
        assert (out / name).is_file(), name
    metrics = metrics_of(out)
    assert [m["step"] for m in metrics] == [5, 10, 12]
    losses = r["losses"]
    assert [m["loss"] for m in metrics] == [sum(losses[0:5]) / 5, sum(losses[5:10]) / 5,
                                            sum(losses[10:12]) / 2]
    assert [m["epoch"] for m in metrics] == [5 / 12, 10 / 12, 1.0]  # 48 rows, batch 4
    assert set(metrics[0]) == {"step", "epoch", "loss", "lr", "grad_norm", "tokens"}
    assert metrics[-1]["tokens"] == r["tokens_seen"]
    assert all(m["grad_norm"] > 0 and m["lr"] > 0 for m in metrics)
    timing = [json.loads(line) for line in (out / "timing.jsonl").read_text().splitlines()]
    assert [t["step"] for t in timing] == [5, 10, 12] and all(t["tokens_per_s"] > 0 for t in timing)
    assert T.latest_checkpoint(out).name == "checkpoint-0000012"  # the final checkpoint
    assert yaml.safe_load((out / "config.yaml").read_text())["max_steps"] == 12
    assert from_argv(["--config", str(out / "config.yaml")]).to_dict() == \
        build_config(causal(llama, text_data, out, max_steps=12, log_every=5)).to_dict()
    assert set(json.loads((out / "eval.json").read_text())) == {"before", "after"}


def run_files(out):
    return {name: (out / name).read_bytes() for name in ("metrics.jsonl", "adapter_model.safetensors")}


def interrupt_in_step(monkeypatch, step, how, grad_accum=2):
    """A forward hook on a LoRA module that, in training mode, cuts into the second
    micro-batch of `step` (0-based) after dropout has drawn its mask."""
    from pyengine.lora import lora_modules
    prepare, calls = T.Run.prepare_model, []

    def hook(module, args, output):
        if module.training:
            calls.append(1)
            if len(calls) == step * grad_accum + 2:
                if how == "raise":  # as if a signal came while our handler was not there
                    raise KeyboardInterrupt
                os.kill(os.getpid(), signal.SIGTERM if how == "sigterm" else signal.SIGINT)

    def with_hook(self):
        prepare(self)
        next(iter(lora_modules(self.model).values())).register_forward_hook(hook)
    monkeypatch.setattr(T.Run, "prepare_model", with_hook)


@pytest.mark.parametrize("how", ["raise", "sigterm", "sigint"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_resume_after_interrupt_is_exact(llama, text_data, tmp_path, monkeypatch, dtype, how):
    """Cut in deep in step 5 (dropout masks drawn, half the window accumulated); the
    resumed run repeats the losses, metrics.jsonl and adapter bytes of an uninterrupted
    run, although the checkpoint step (4 or 5) is not a multiple of log_every."""
    kw = dict(dtype=dtype, grad_accum=2, lora_dropout=0.2, max_steps=7, log_every=3)
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    full = run(causal(llama, text_data, tmp_path / "full", **kw))
    with monkeypatch.context() as m:
        interrupt_in_step(m, 4, how)
        with pytest.raises(KeyboardInterrupt) as stopped:
            run(causal(llama, text_data, tmp_path / "split", **kw))
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers
    want_step = 4 if how == "raise" else 5  # a signal lets the step finish
    assert T.latest_checkpoint(tmp_path / "split").name == f"checkpoint-{want_step:07d}"
    if how != "raise":
        assert stopped.value.signum == {"sigterm": signal.SIGTERM, "sigint": signal.SIGINT}[how]
    resumed = run(causal(llama, text_data, tmp_path / "split", resume=True, **kw))
    assert resumed["losses"] == full["losses"]  # bit for bit
    assert run_files(tmp_path / "split") == run_files(tmp_path / "full")


def test_second_ctrl_c_aborts_without_a_checkpoint(llama, text_data, tmp_path, monkeypatch):
    from pyengine.lora import lora_modules
    prepare = T.Run.prepare_model

    def with_hook(self):
        prepare(self)
        next(iter(lora_modules(self.model).values())).register_forward_hook(
            lambda *_: [os.kill(os.getpid(), signal.SIGINT) for _ in range(2)])
    monkeypatch.setattr(T.Run, "prepare_model", with_hook)
    with pytest.raises(KeyboardInterrupt) as aborted:
        run(causal(llama, text_data, tmp_path / "o", eval_data=None))
    assert not isinstance(aborted.value, T.Interrupted)
    assert T.latest_checkpoint(tmp_path / "o") is None


def test_signal_handlers_of_the_caller_come_back(llama, text_data, tmp_path):
    """Handlers the caller installed (not only the defaults) are restored after a run."""
    def mine(signum, frame):
        pass
    previous = signal.signal(signal.SIGINT, mine), signal.signal(signal.SIGTERM, mine)
    try:
        run(causal(llama, text_data, tmp_path / "o", max_steps=1, eval_data=None))
        assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == (mine, mine)
    finally:
        signal.signal(signal.SIGINT, previous[0])
        signal.signal(signal.SIGTERM, previous[1])


def test_one_target_module_name_adapts_that_module(llama, text_data, tmp_path):
    from pyengine.lora import lora_modules
    r = T.Run(build_config(causal(llama, text_data, tmp_path / "o", target_modules="q_proj")))
    assert sorted(lora_modules(r.model)) == ["model.layers.0.self_attn.q_proj",
                                             "model.layers.1.self_attn.q_proj"]


def test_finished_run_is_extended_by_resume(llama, text_data, tmp_path, monkeypatch):
    """Two checkpoints are kept (2 and 4): --resume continues from the newest."""
    out = tmp_path / "o"
    first = run(causal(llama, text_data, out, max_steps=4, save_every=2))
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-0000002",
                                                                "checkpoint-0000004"]
    steps_run = []
    accumulate = T.Run.accumulate
    monkeypatch.setattr(T.Run, "accumulate", lambda self, step: steps_run.append(step) or
                        accumulate(self, step))
    more = run(causal(llama, text_data, out, max_steps=6, resume=True))
    assert steps_run == [4, 5] and more["losses"][:4] == first["losses"] and more["steps"] == 6
    assert [m["step"] for m in metrics_of(out)] == [2, 4, 6]


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_same_command_same_bits_on_two_threads(llama, text_data, tmp_path, dtype):
    """LoRA on every linear incl. the fused MLP; 2 threads; two runs, identical bits."""
    kw = dict(dtype=dtype, max_steps=12, grad_accum=2, eval_data=None, lora_dropout=0.1)
    with num_threads(2):
        a = run(causal(llama, text_data, tmp_path / "a", **kw))
        b = run(causal(llama, text_data, tmp_path / "b", **kw))
    assert a["losses"] == b["losses"]
    assert run_files(tmp_path / "a") == run_files(tmp_path / "b")


def test_killed_while_saving_leaves_previous_checkpoint(llama, text_data, tmp_path, monkeypatch):
    kw = dict(save_every=2, max_steps=6)
    full = run(causal(llama, text_data, tmp_path / "full", **kw))["losses"]
    real_write, calls = T.write_checkpoint_files, []

    def dies_on_second_save(directory, payload):
        calls.append(directory)
        real_write(directory, payload)  # the temp dir is fully written ...
        if len(calls) == 2:
            raise SystemExit("killed")  # ... but the process dies before the rename
    monkeypatch.setattr(T, "write_checkpoint_files", dies_on_second_save)
    out = tmp_path / "killed"
    with pytest.raises(SystemExit):
        run(causal(llama, text_data, out, **kw))
    assert T.latest_checkpoint(out).name == "checkpoint-0000002"
    monkeypatch.setattr(T, "write_checkpoint_files", real_write)
    resumed = run(causal(llama, text_data, out, resume=True, **kw))
    assert resumed["losses"] == full
    assert not list(out.glob(".tmp-*"))
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-0000004",
                                                                "checkpoint-0000006"]


def test_adapter_loads_in_peft_and_merge_equals_base_plus_adapter(llama, text_data, tmp_path):
    from transformers import AutoModelForCausalLM
    out = tmp_path / "out"
    trained = T.Run(build_config(causal(llama, text_data, out, merge=True, max_steps=4)))
    trained()
    ids = torch.randint(4, 200, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = trained.model.eval()(input_ids=ids).logits
        peft = peft_model(llama, str(out), AutoModelForCausalLM)(input_ids=ids).logits
        merged = AutoModelForCausalLM.from_pretrained(out / "merged").eval()(input_ids=ids).logits
        base = AutoModelForCausalLM.from_pretrained(llama).eval()(input_ids=ids).logits
    assert (peft - base).abs().max() > 1e-3  # the adapter changes the output
    torch.testing.assert_close(peft, ours, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(merged, peft, rtol=1e-4, atol=1e-5)


def test_seq_cls_bert(bert, cls_data, tmp_path):
    from transformers import AutoModelForSequenceClassification
    out = tmp_path / "out"
    trained = T.Run(build_config(dict(
        model=bert, data=cls_data[0], eval_data=cls_data[1], task="seq-cls", output=str(out),
        batch_size=16, epochs=3, lr=5e-3, dtype="fp32", progress=False, max_seq_len=48)))
    r = trained()
    assert sum(r["losses"][-3:]) < sum(r["losses"][:3]) - 0.5
    ev = r["eval_after"]
    assert ev["accuracy"] > r["eval_before"]["accuracy"] + 0.2
    assert set(ev["per_class"]) == {"negative", "positive"}
    assert sum(c["support"] for c in ev["per_class"].values()) == ev["examples"] == 32
    assert r["truncated"] > 0  # max_seq_len=48 cuts some of the long sentences
    assert json.loads((out / "labels.json").read_text()) == {  # class names with the adapter
        "id2label": {"0": "negative", "1": "positive"}, "label2id": {"negative": 0, "positive": 1}}
    enc = trained.tokenizer(["A wonderful day", "The soup was cold"], return_tensors="pt",
                            padding=True)
    with torch.no_grad():
        ours = trained.model.eval()(**enc).logits
        peft = peft_model(bert, str(out), AutoModelForSequenceClassification)(**enc).logits
    torch.testing.assert_close(peft, ours, rtol=1e-4, atol=1e-5)


def test_labels_json_keeps_the_given_class_order(bert, cls_data, tmp_path):
    """--labels in an unsorted order: labels.json maps the ids the run trained with."""
    out = tmp_path / "o"
    trained = T.Run(build_config(dict(
        model=bert, data=cls_data[0], task="seq-cls", output=str(out), labels=["positive", "negative"],
        batch_size=4, max_steps=1, dtype="fp32", progress=False, max_seq_len=16)))
    trained()
    assert trained.train.examples[1].labels == 0  # row 1 is "positive"
    assert json.loads((out / "labels.json").read_text()) == {
        "id2label": {"0": "positive", "1": "negative"}, "label2id": {"positive": 0, "negative": 1}}


def test_token_cls_bert(bert, tmp_path):
    rows = []
    for r in sentences(64):
        words = r["text"].rstrip(".").split()
        rows.append({"tokens": words, "tags": ["LONG" if len(w) > 5 else "SHORT" for w in words]})
    data = write_jsonl(tmp_path / "tok.jsonl", rows)
    r = run(dict(model=bert, data=data, eval_data=data, task="token-cls", output=str(tmp_path / "o"),
                 batch_size=16, epochs=4, lr=1e-2, dtype="bf16", progress=False))
    assert r["eval_after"]["accuracy"] > r["eval_before"]["accuracy"]
    n_words = sum(len(x["tokens"]) for x in rows)
    assert r["eval_after"]["examples"] == n_words  # one label per word (its first sub-token)


def test_full_finetune_and_packing(llama, text_data, tmp_path):
    r = run(causal(llama, text_data, tmp_path / "o", method="full", packing=True,
                   max_seq_len=64, lr=3e-3, dtype="bf16", grad_checkpointing=True))
    assert sum(r["losses"][-3:]) < sum(r["losses"][:3])
    assert (tmp_path / "o" / "config.json").is_file()
    unpacked = run(causal(llama, text_data, tmp_path / "u", method="full", max_seq_len=64,
                          dtype="bf16", max_steps=1))
    assert r["eval_before"] == unpacked["eval_before"]  # evaluation is never packed


def test_chat_template_used_in_training_is_saved(llama, tmp_path):
    from transformers import AutoTokenizer
    from pyengine.data import FALLBACK_CHAT_TEMPLATE
    from pyengine.infer import encode_prompt
    rows = [{"messages": [{"role": "user", "content": r["text"]},
                          {"role": "assistant", "content": "Noted."}]} for r in sentences(8)]
    out = tmp_path / "o"
    run(dict(model=llama, data=write_jsonl(tmp_path / "chat.jsonl", rows), output=str(out),
             max_steps=1, batch_size=4, progress=False))
    saved = AutoTokenizer.from_pretrained(out)
    assert saved.chat_template == FALLBACK_CHAT_TEMPLATE
    assert encode_prompt(saved, "Hi", chat=True) == saved(
        "<|user|>\nHi</s>\n<|assistant|>\n", add_special_tokens=False)["input_ids"]


def test_all_masked_window_gives_zero_loss_not_nan(llama, tmp_path):
    long_prompt = " ".join(r["text"] for r in sentences(6))
    rows = [{"instruction": long_prompt, "output": "Fine."}] * 8
    data = write_jsonl(tmp_path / "alpaca.jsonl", rows)
    r = run(dict(model=llama, data=data, task="causal-lm", output=str(tmp_path / "o"),
                 max_seq_len=16, batch_size=4, max_steps=2, progress=False))
    assert r["losses"] == [0.0, 0.0] and r["truncated"] == 8


def test_grad_accum_normalises_over_the_whole_window(llama, tmp_path):
    from pyengine import data as D, models as M
    rows = [{"instruction": r["text"], "output": r["text"][: 10 + 7 * i]}
            for i, r in enumerate(sentences(4))]  # different labelled-token counts per row
    cfg = build_config(dict(model=llama, data=write_jsonl(tmp_path / "a.jsonl", rows),
                            output=str(tmp_path / "o"), dtype="fp32", progress=False))
    run_ = T.Run(cfg)
    examples = run_.train.examples
    pad = run_.tokenizer.pad_token_id

    def grads(batches):
        run_.model.zero_grad()
        n = sum(M.count_items("causal-lm", b["labels"]) for b in batches)
        for b in batches:
            M.training_loss("causal-lm", run_.model, b, n, torch.float32).backward()
        return [p.grad.clone() for _, p in run_.params]
    whole = grads([D.collate(examples, pad)])
    split = grads([D.collate(examples[:1], pad), D.collate(examples[1:], pad)])
    for a, b in zip(whole, split):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("warmup_ratio, warmup", [(0.0, 0), (0.34, 2)])
def test_epochs_with_grad_accum_steps_epochs_and_lr_schedule(llama, text_data, tmp_path,
                                                             warmup_ratio, warmup):
    """epochs=1, 48 rows, batch 4, grad_accum 2: 12 micro-batches = 6 optimizer steps; each
    metrics line has the epoch reached and the lr that step used (linear warmup over
    int(warmup_ratio * 6) optimizer steps, then cosine to 0)."""
    r = run(causal(llama, text_data, tmp_path / "out", max_steps=None, epochs=1, grad_accum=2,
                   log_every=1, lr=1e-3, warmup_ratio=warmup_ratio))
    metrics = metrics_of(tmp_path / "out")
    assert len(r["losses"]) == 6 and [m["step"] for m in metrics] == [1, 2, 3, 4, 5, 6]
    assert [m["epoch"] for m in metrics] == [s * 2 / 12 for s in range(1, 7)]
    want_lr = [1e-3 * (s / warmup if s < warmup else
                       0.5 * (1 + math.cos(math.pi * (s - warmup) / (6 - warmup))))
               for s in range(6)]
    assert [m["lr"] for m in metrics] == pytest.approx(want_lr, rel=1e-12, abs=1e-18)


def test_accumulated_step_gradients_equal_one_big_batch(llama, text_data, tmp_path):
    """Run.accumulate over grad_accum micro-batches leaves the gradients of the mean loss of
    one batch holding all their examples (normalised by the window's labelled tokens)."""
    from pyengine import data as D, models as M
    rows = [{"instruction": r["text"], "output": r["text"][: 10 + 7 * i]}
            for i, r in enumerate(sentences(8))]  # different labelled-token counts per row
    run_ = T.Run(build_config(dict(model=llama, data=write_jsonl(tmp_path / "a.jsonl", rows),
                                   output=str(tmp_path / "o"), dtype="fp32", progress=False,
                                   batch_size=2, grad_accum=2)))
    run_.accumulate(0)
    accumulated = [p.grad.clone() for _, p in run_.params]
    run_.model.zero_grad()
    picked = run_._order(0)[:4]  # micro-batches 0 and 1 of epoch 0
    whole = D.collate([run_.train.examples[i] for i in picked], run_.tokenizer.pad_token_id)
    M.training_loss("causal-lm", run_.model, whole, M.count_items("causal-lm", whole["labels"]),
                    torch.float32).backward()
    for (name, p), a in zip(run_.params, accumulated):
        torch.testing.assert_close(a, p.grad, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("max_grad_norm", [0.0, 0.5])
def test_clipping_off_at_zero_and_to_the_given_norm(llama, text_data, tmp_path, max_grad_norm):
    """update() hands the optimizer the raw gradients when max_grad_norm is 0 (off), else
    gradients rescaled to total norm max_grad_norm."""
    run_ = T.Run(build_config(causal(llama, text_data, tmp_path / "o",
                                     max_grad_norm=max_grad_norm)))
    for i, (_, p) in enumerate(run_.params):
        p.grad = torch.full_like(p, 0.1 * (i + 1))
    raw = [p.grad.clone() for _, p in run_.params]
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in raw]))
    seen = []
    run_.optimizer.step = lambda: seen.extend(p.grad.clone() for _, p in run_.params)
    got_norm, _ = run_.update()
    assert got_norm == pytest.approx(float(norm), rel=1e-6)
    factor = 1.0 if max_grad_norm == 0 else max_grad_norm / (float(norm) + 1e-6)
    for g, r in zip(seen, raw):
        torch.testing.assert_close(g, r * factor, rtol=1e-6, atol=0)


def test_the_trained_model_runs_the_fused_kernels(llama, bert, text_data, cls_data, tmp_path):
    """prepare_model patches the instance it trains: every norm is pyengine's, the decoder
    attention / layer forwards are patching.py's, attention is pyengine's kernel (a run on HF's
    own modules would be slower, not wrong, so nothing else would notice)."""
    from pyengine import patching
    from pyengine.nn.norms import LayerNorm, RMSNorm
    run_ = T.Run(build_config(causal(llama, text_data, tmp_path / "a", dtype="bf16")))
    layers = run_.model.get_decoder().layers
    assert all(isinstance(m, RMSNorm) for m in (layers[0].input_layernorm,
                                                 layers[-1].post_attention_layernorm,
                                                 run_.model.get_decoder().norm))
    assert all(layer.forward.__func__ is patching._decoder_forward for layer in layers)
    assert all(layer.self_attn.forward.__func__ is patching._attention_forward for layer in layers)
    assert run_.model.forward.__func__ is patching._causal_lm_forward  # pyengine.patch's loss
    assert run_.model.config._attn_implementation == "pyengine"
    run_ = T.Run(build_config(dict(model=bert, data=cls_data[0], task="seq-cls",
                                   output=str(tmp_path / "b"), progress=False)))
    norms = [m for m in run_.model.modules() if "LayerNorm" in type(m).__name__]
    assert norms and all(type(m) is LayerNorm for m in norms)
    assert run_.model.config._attn_implementation == "pyengine"


def test_weight_decay_skips_biases_and_norms(bert, cls_data, tmp_path):
    """Only matrices decay: every 1-D trainable parameter (the head's bias, LayerNorm
    weights under full fine-tuning) sits in a group with weight_decay 0."""
    run_ = T.Run(build_config(dict(model=bert, data=cls_data[0], task="seq-cls", method="full",
                                   output=str(tmp_path / "o"), weight_decay=0.1, progress=False)))
    decay = {id(p): g["weight_decay"] for g in run_.optimizer.param_groups for p in g["params"]}
    assert len(decay) == len(run_.params)
    one_d = [n for n, p in run_.params if p.ndim == 1]
    assert "classifier.bias" in one_d and any("LayerNorm" in n for n in one_d)
    assert all(decay[id(p)] == (0.1 if p.ndim >= 2 else 0.0) for _, p in run_.params)
    # one fused kernel per step, not torch's default per-parameter loop on CPU
    assert all(g["fused"] for g in run_.optimizer.param_groups)


# --------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize("content, message", [
    ('{"text": "ok"}\n{"text": "broken"\n', r"train.jsonl:2: malformed JSON"),
    ('{"text": "ok"}\n\n{"txt": "typo"}\n', r"train.jsonl:3: missing field"),
    ('{"text": "ok"}\n[1, 2]\n', r"train.jsonl:2: expected a JSON object"),
    ('{"instruction": "hi"}\n', r"train.jsonl:1: missing field 'output'"),
    ('{"messages": [{"role": "user", "content": "hi"}]}\n', r"train.jsonl:1: .*no 'assistant'"),
    ('{"text": 5}\n', r"train.jsonl:1: field 'text' must be str"),
    ("", r"train.jsonl: no examples"),
    ("\n  \n", r"train.jsonl: no examples"),
])
def test_bad_causal_data_fails_before_writing(llama, tmp_path, content, message):
    (tmp_path / "train.jsonl").write_text(content)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=message):
        run(dict(model=llama, data=str(tmp_path / "train.jsonl"), output=str(out), progress=False))
    assert not out.exists()


@pytest.mark.parametrize("task, train, val, message", [
    ("seq-cls", [{"text": "a", "label": "pos"}, {"text": "b"}], None, r"train.jsonl:2: missing field 'label'"),
    ("seq-cls", [{"text": "a", "label": "pos"}, {"text": "b", "label": "pos"}], None,
     r"found 1 class"),
    ("seq-cls", [{"text": "a", "label": "pos"}, {"text": "b", "label": "neg"}],
     [{"text": "c", "label": "meh"}], r"val.jsonl:1: label 'meh' is not a known class"),
    ("token-cls", [{"tokens": ["a", "b"], "tags": ["X"]}, {"tokens": ["c"], "tags": ["Y"]}], None,
     r"train.jsonl:1: 2 tokens but 1 tags"),
    ("token-cls", [{"tokens": ["a"], "tags": ["X"]}, {"tokens": ["b"]}], None,
     r"train.jsonl:2: missing field 'tags'"),
])
def test_bad_classification_data(bert, tmp_path, task, train, val, message):
    cfg = dict(model=bert, task=task, data=write_jsonl(tmp_path / "train.jsonl", train),
               output=str(tmp_path / "out"), progress=False)
    if val:
        cfg["eval_data"] = write_jsonl(tmp_path / "val.jsonl", val)
    with pytest.raises(ValueError, match=message):
        run(cfg)
    assert not (tmp_path / "out").exists()


def test_bad_config(llama, text_data, tmp_path):
    with pytest.raises(ValueError, match="unknown config key 'lora_rank'"):
        build_config(dict(model=llama, data=text_data[0], lora_rank=8))
    (tmp_path / "run.yaml").write_text("model: x\nbatch-size: 2\nlearning_rate: 0.1\n")
    with pytest.raises(ValueError, match="run.yaml: unknown config key 'learning_rate'"):
        from_argv(["--config", str(tmp_path / "run.yaml")])
    with pytest.raises(FileNotFoundError, match="model directory .*nope does not exist"):
        run(dict(model=str(tmp_path / "nope"), data=text_data[0], output=str(tmp_path / "o")))
    with pytest.raises(FileNotFoundError, match="data file .*missing.jsonl does not exist"):
        run(dict(model=llama, data=str(tmp_path / "missing.jsonl"), output=str(tmp_path / "o")))
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        run(dict(model=llama, data=text_data[0], output=str(tmp_path / "o"), resume=True))
    with pytest.raises(ValueError, match="packing only applies to task causal-lm"):
        build_config(dict(model=llama, data=text_data[0], task="seq-cls", packing=True))
    assert not (tmp_path / "o").exists()


def test_yaml_with_cli_overrides(llama, text_data, tmp_path):
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(dict(
        model=llama, data=text_data[0], lora_r=4, batch_size=2, lr=0.5)))
    cfg = from_argv(["--config", str(tmp_path / "run.yaml"), "--batch-size", "3", "--packing",
                     "--target-modules", "q_proj", "v_proj"])
    assert (cfg.lora_r, cfg.batch_size, cfg.lr, cfg.packing) == (4, 3, 0.5, True)
    assert cfg.target_modules == ["q_proj", "v_proj"]
    default = from_argv([])
    assert default.task == "seq-cls" and default.model.endswith("model")
    assert from_argv(["--epochs", "1"]).epochs == 1.0  # overrides apply to the default job


def test_cli_help_and_error_exit(tmp_path):
    help_ = subprocess.run([sys.executable, "-m", "pyengine.finetune", "--help"],
                           capture_output=True, text=True)
    assert help_.returncode == 0 and "--grad-accum" in help_.stdout and "--merge" in help_.stdout
    bad = subprocess.run([sys.executable, "-m", "pyengine.finetune", "--data",
                          str(tmp_path / "none.jsonl"), "--model", str(tmp_path)],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "error: model directory" in bad.stderr


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_qlora_nf4_loss_decreases_and_merges(tmp_path, text_data, dtype, monkeypatch):
    """hidden 64: every projection's in_features is a multiple of nf4's 64-block."""
    from pyengine.lora import lora_modules
    model_dir = make_llama(tmp_path / "llama64", hidden_size=64)
    seen = {}
    prepare = T.Run.prepare_model

    def spy(self):
        prepare(self)
        seen["fmts"] = {m.quant_fmt for m in lora_modules(self.model).values()}
    monkeypatch.setattr(T.Run, "prepare_model", spy)
    r = run(causal(model_dir, text_data, tmp_path / "o", quant="nf4", dtype=dtype,
                   max_steps=10, merge=True))
    assert seen["fmts"] == {"nf4"}
    assert sum(r["losses"][-3:]) < sum(r["losses"][:3])
    assert (tmp_path / "o" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "o" / "merged" / "config.json").is_file()


def test_quant_config(llama, text_data, tmp_path):
    assert from_argv(["--model", llama, "--data", text_data[0], "--quant", "q4_0"]).quant == "q4_0"
    with pytest.raises(ValueError, match="quant nf4 needs method lora"):
        build_config(dict(model=llama, data=text_data[0], method="full", quant="nf4"))
    with pytest.raises(ValueError, match="quant = 'int3': Input should be 'none', 'nf4', 'q4_0' or 'q8_0'"):
        build_config(dict(model=llama, data=text_data[0], quant="int3"))


# --------------------------------------------------------------------------- the user's files
def snapshot(directory):
    return {str(p.relative_to(directory)): p.read_bytes() if p.is_file() else None
            for p in sorted(directory.rglob("*"))}


@pytest.fixture(scope="module")
def finished(llama, text_data, tmp_path_factory):
    """A finished run's directory (copied by tests that change it)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    run(causal(llama, text_data, out, max_steps=4, eval_data=None))
    return out


def test_rerun_into_a_run_directory_is_refused_and_loses_nothing(llama, text_data, finished):
    before = snapshot(finished)
    with pytest.raises(ValueError, match=f"--output {finished} is not empty .*--resume .*--overwrite"):
        run(causal(llama, text_data, finished, max_steps=4, eval_data=None))
    bad = str(finished.parent / "missing.jsonl")  # --overwrite, but an input is bad
    with pytest.raises(FileNotFoundError, match="missing.jsonl does not exist"):
        run(causal(llama, (bad, None), finished, max_steps=4, eval_data=None, overwrite=True))
    assert snapshot(finished) == before


def test_overwrite_replaces_the_run_as_a_whole(llama, text_data, finished, tmp_path):
    import shutil
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    (out / "notes.txt").write_text("old")
    run(causal(llama, text_data, out, max_steps=2, eval_data=None, overwrite=True))
    assert not (out / "notes.txt").exists()
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-0000002"]


def test_overwrite_refuses_a_directory_that_is_not_a_run(llama, text_data, tmp_path):
    out = tmp_path / "project"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"holds files that are not a pyengine run \(notes.txt\)"):
        run(causal(llama, text_data, out, max_steps=2, eval_data=None, overwrite=True))
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_resume_past_the_requested_steps_is_refused(llama, text_data, finished, tmp_path):
    import shutil
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    before = snapshot(out)
    with pytest.raises(ValueError, match=r"checkpoint-0000004 is at step 4, past this run's 2 steps"):
        run(causal(llama, text_data, out, max_steps=2, eval_data=None, resume=True))
    assert snapshot(out) == before


def test_resume_with_other_eval_data_reports_no_before(llama, text_data, tmp_path):
    out = tmp_path / "run"
    first = run(causal(llama, text_data, out, max_steps=2))
    assert first["eval_before"] is not None
    more = run(causal(llama, text_data, out, max_steps=3, resume=True, eval_data=text_data[0]))
    assert more["eval_before"] is None and more["eval_after"]["tokens"] > first["eval_after"]["tokens"]


@pytest.mark.parametrize("key, value, shown", [
    ("lr", 0.1, "lr 0.03 -> 0.1"),
    ("lora_alpha", 8, "lora_alpha 32.0 -> 8.0"),
    ("seed", 1, "seed 0 -> 1"),
])
def test_resume_refuses_changed_training_settings(llama, text_data, finished, key, value, shown):
    with pytest.raises(ValueError, match=f"--resume: .*checkpoint-0000004 was trained with other "
                                         f"settings: {re.escape(shown)}"):
        run(causal(llama, text_data, finished, eval_data=None, resume=True, **{key: value}))


def test_resume_refuses_other_data(llama, text_data, finished, tmp_path):
    other = write_jsonl(tmp_path / "train.jsonl", [{"text": r["text"]} for r in sentences(40)])
    with pytest.raises(ValueError, match=r"data .*text.*train.jsonl' -> .*train.jsonl'; "
                                         r"data_sha256 "):
        run(causal(llama, (other, None), finished, eval_data=None, resume=True))


def test_checkpoint_loading_unpickles_no_objects(llama, text_data, finished, tmp_path):
    import shutil
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    marker = tmp_path / "code-ran"

    class Evil:
        def __reduce__(self):
            return open, (str(marker), "w")
    torch.save({"trainable": Evil()}, out / "checkpoint-0000004" / "state.pt")
    with pytest.raises(ValueError, match="checkpoint-0000004/state.pt: not a pyengine checkpoint"):
        run(causal(llama, text_data, out, eval_data=None, resume=True))
    assert not marker.exists()


@pytest.mark.parametrize("where", ["model", "inside model", "parent of model", "parent of data"])
def test_output_never_overlaps_the_inputs(llama, tmp_path, where):
    import shutil
    model = tmp_path / "models" / "llama"
    shutil.copytree(llama, model)
    (tmp_path / "data").mkdir()
    data = write_jsonl(tmp_path / "data" / "train.jsonl", [{"text": "a b c"}] * 4)
    out = {"model": model, "inside model": model / "ft", "parent of model": tmp_path / "models",
           "parent of data": tmp_path / "data"}[where]
    before = snapshot(tmp_path)
    with pytest.raises(ValueError, match="--output .* overlaps the (model directory|data file)"):
        run(dict(model=str(model), data=data, output=str(out), method="full", overwrite=True,
                 max_steps=1, progress=False))
    assert snapshot(tmp_path) == before


# --------------------------------------------------------------------------- CLI errors
def tiny_gpt2(directory):
    from transformers import GPT2Config, GPT2LMHeadModel
    from tests.tiny_hf import llama_tokenizer
    tok = llama_tokenizer()
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=1, n_head=2,
                               n_positions=64)).save_pretrained(directory)
    tok.save_pretrained(directory)
    return str(directory)


def broken_model(kind, llama, tmp_path):
    import shutil
    d = tmp_path / f"model-{kind}"
    shutil.copytree(llama, d)
    if kind == "corrupt":
        (d / "model.safetensors").write_bytes(b"not a safetensors file")
    else:
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            (d / name).unlink(missing_ok=True)
    return str(d)


def bytes_file(path, content: bytes) -> str:
    path.write_bytes(content)
    return str(path)


CLI_ERRORS = {  # name: (argv given the fixtures, message regex)
    "corrupt weights": (lambda f: ["--model", broken_model("corrupt", f.llama, f.tmp)],
                        r"model directory .*model-corrupt: cannot load the model: .*header"),
    "no tokenizer": (lambda f: ["--model", broken_model("notok", f.llama, f.tmp)],
                     r"model directory .*model-notok has no tokenizer files"),
    "model config.json": (lambda f: ["--model", f.llama + "/config.json"],
                          r"model .*config.json is a file: pass the model directory"),
    "data directory": (lambda f: ["--data", str(f.tmp)], r"data file .* is a directory"),
    "output file": (lambda f: ["--output", f.text[0]], r"--output .*train.jsonl is an existing file"),
    "labelled data, causal-lm": (lambda f: ["--data", f.cls[0]],
                                 r".*train.jsonl:1: field 'label': labelled data is for --task seq-cls"),
    "encoder for causal-lm": (lambda f: ["--model", f.bert], r"model .* is an encoder \(bert\)"),
    "int label out of --labels": (
        lambda f: ["--model", f.bert, "--task", "seq-cls", "--labels", "neg", "pos", "--data",
                   write_jsonl(f.tmp / "int.jsonl", [{"text": "a", "label": 1},
                                                     {"text": "b", "label": 2}])],
        r".*int.jsonl:2: label 2 is not an index into the class names \['neg', 'pos'\]"),
    "invalid utf-8": (lambda f: ["--data", bytes_file(f.tmp / "latin1.jsonl", b'{"text": "caf\xe9"}\n')],
                      r".*latin1.jsonl:1: not valid UTF-8 at byte 14 of the line \(0xe9\)"),
    "malformed json": (lambda f: ["--data", bytes_file(f.tmp / "bad.jsonl", b'{"text": "a"}\n{"text" "b"}\n')],
                       r".*bad.jsonl:2: malformed JSON: Expecting ':' delimiter \(column 9\)"),
    "gpt2 conv1d": (lambda f: ["--model", tiny_gpt2(f.tmp / "gpt2")],
                    r"apply_lora: architecture not supported: Conv1D layers \(GPT-2 style\), e.g. 'transformer.h.0.attn.c_attn'"),
    "fractional batch size": (lambda f: ["--batch-size", "4.9"],
                              r"command line: batch_size = '4.9': Input should be a valid integer"),
}


@pytest.mark.parametrize("case", CLI_ERRORS)
def test_cli_errors_exit_2_and_write_nothing(llama, bert, text_data, cls_data, tmp_path, capsys, case):
    from types import SimpleNamespace
    from pyengine.finetune.__main__ import main
    fixtures = SimpleNamespace(llama=llama, bert=bert, text=text_data, cls=cls_data, tmp=tmp_path)
    make_argv, message = CLI_ERRORS[case]
    argv = ["--model", llama, "--data", text_data[0], "--output", str(tmp_path / "out"),
            "--no-progress"] + make_argv(fixtures)
    before = snapshot(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err  # (transformers' loading bars may come before)
    assert re.fullmatch("error: " + message + ".*", err.splitlines()[-1]), err
    assert "Traceback" not in err and err.count("error:") == 1
    assert snapshot(tmp_path) == before and not (tmp_path / "out").exists()


def test_cli_error_for_a_backend_that_cannot_run(llama, text_data, tmp_path, capsys, monkeypatch):
    from pyengine.finetune.__main__ import main
    monkeypatch.setenv("PYENGINE_BACKEND", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # a CPU-only machine
    out = tmp_path / "out"
    assert main(["--model", llama, "--data", text_data[0], "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert re.match(r"error: .*PYENGINE_BACKEND='triton' requested but unavailable: .*GPU",
                    err.splitlines()[-1]), err
    assert "Traceback" not in err
    assert not out.exists()
