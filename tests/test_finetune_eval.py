"""The training loop's evaluation features: --eval-every, early stopping, the best
checkpoint and --load-best-at-end, --test-data reports (entity-level F1), --eval-only and
--report-to tensorboard. Tiny models, a few steps each."""
from __future__ import annotations

import json
import re
import sys

import pytest
import torch
from safetensors.torch import load_file

from pyengine import data as D
from pyengine.finetune import build_config, run
from pyengine.finetune import trainer as T
from pyengine.metrics import entity_chunks, entity_report
from tests.test_finetune import causal, interrupt_in_step, metrics_of, snapshot
from tests.tiny_hf import sentences, write_jsonl

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def text_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("text")
    rows = [{"text": r["text"]} for r in sentences(48)]
    return write_jsonl(d / "train.jsonl", rows), write_jsonl(d / "val.jsonl", rows[:8])


@pytest.fixture(scope="module")
def ner_data(tmp_path_factory):
    """IOB2 tags: each run of long words is a LONG entity, each capitalised word a CAP."""
    rows = []
    for r in sentences(48):
        words, tags = r["text"].rstrip(".").split(), []
        for w in words:
            kind = "CAP" if w[0].isupper() else "LONG" if len(w) > 5 else None
            tags.append("O" if kind is None else
                        f"I-{kind}" if tags and tags[-1].endswith(kind) else f"B-{kind}")
        rows.append({"tokens": words, "tags": tags})
    d = tmp_path_factory.mktemp("ner")
    return write_jsonl(d / "train.jsonl", rows[:32]), write_jsonl(d / "test.jsonl", rows[32:])


# --------------------------------------------------------------------------- entity F1
@pytest.mark.parametrize("tags, chunks", [
    ([], []),
    (["O", "O"], []),
    (["B-PER", "I-PER", "O", "B-LOC"], [("PER", 0, 2), ("LOC", 3, 4)]),
    (["I-PER", "I-PER"], [("PER", 0, 2)]),                         # I- after nothing starts
    (["O", "I-PER", "I-LOC", "I-LOC"], [("PER", 1, 2), ("LOC", 2, 4)]),  # I- of another type
    (["B-PER", "B-PER", "I-PER"], [("PER", 0, 1), ("PER", 1, 3)]),  # B- after B- of the type
    (["B-PER", "I-LOC", "O", "I-PER"], [("PER", 0, 1), ("LOC", 1, 2), ("PER", 3, 4)]),
    (["O", "B-X"], [("X", 1, 2)]),                                 # runs to the end
    (["B-A-B", "I-A-B"], [("A-B", 0, 2)]),                         # a type with a hyphen
    (["PER", "PER", "O", "LOC", "PER"], [("PER", 0, 2), ("LOC", 3, 4), ("PER", 4, 5)]),  # IO
])
def test_entity_chunks(tags, chunks):
    assert entity_chunks(tags) == chunks


def test_entity_report_exact():
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG"], ["I-LOC", "I-LOC"]]
    pred = [["B-PER", "I-PER", "O", "O"], ["B-LOC"], ["B-LOC", "I-LOC"]]
    # gold: PER(0,0-2) LOC(0,3-4) ORG(1,0-1) LOC(2,0-2); predicted: PER(0,0-2) LOC(1,0-1)
    # LOC(2,0-2): hits PER and the sentence-2 LOC
    r = entity_report(gold, pred)
    assert r["per_type"] == {
        "LOC": dict(precision=1 / 2, recall=1 / 2, f1=2 * (1 / 2) * (1 / 2) / (1 / 2 + 1 / 2),
                    support=2),
        "ORG": dict(precision=0.0, recall=0.0, f1=0.0, support=1),
        "PER": dict(precision=1.0, recall=1.0, f1=1.0, support=1)}
    assert r["micro"] == dict(precision=2 / 3, recall=2 / 4,
                              f1=2 * (2 / 3) * (2 / 4) / (2 / 3 + 2 / 4), support=4)
    assert r["macro"] == dict(precision=(0.5 + 0.0 + 1.0) / 3, recall=(0.5 + 0.0 + 1.0) / 3,
                              f1=(0.5 + 0.0 + 1.0) / 3, support=4)
    with pytest.raises(ValueError, match="sentence 1 has 1 gold tags, 2 predicted"):
        entity_report(gold, [pred[0], ["O", "O"], pred[2]])


# --------------------------------------------------------------------------- config
@pytest.mark.parametrize("kw, message", [
    (dict(eval_every=2, eval_data=None), "eval_every needs eval_data"),
    (dict(early_stopping_patience=2), "early_stopping_patience needs eval_data and eval_every"),
    (dict(load_best_at_end=True), "load_best_at_end needs eval_data and eval_every"),
    (dict(eval_every=2, metric_for_best="accuracy"),
     r"metric_for_best 'accuracy' is not a causal-lm metric \(allowed: loss, perplexity\)"),
    (dict(eval_every=2, metric_for_best="recall"), r"metric_for_best = 'recall': Input should be"),
    (dict(eval_only=True, eval_data=None), "eval_only needs eval_data and/or test_data"),
    (dict(eval_only=True, merge=True), "eval_only runs no training: merge does not apply"),
    (dict(adapter="x"), r"adapter applies to eval_only"),
    (dict(report_to="wandb"), r"report_to = 'wandb': Input should be 'none' or 'tensorboard'"),
])
def test_bad_evaluation_config(llama, text_data, tmp_path, kw, message):
    with pytest.raises(ValueError, match=message):
        build_config(causal(llama, text_data, tmp_path / "o", **kw))


def test_cli_config_error_writes_nothing(llama, text_data, tmp_path, capsys):
    from pyengine.finetune.__main__ import main
    out = tmp_path / "out"
    assert main(["--model", llama, "--data", text_data[0], "--output", str(out),
                 "--early-stopping-patience", "2", "--eval-data", text_data[1]]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        "error: command line: early_stopping_patience needs eval_data and eval_every "
        "(evaluations during training)")
    assert not out.exists()


# --------------------------------------------------------------------------- --eval-every
def test_eval_every_lines_and_final_eval(llama, text_data, tmp_path):
    """Evaluations at steps 3, 6 and the last (8), after that step's training line; the
    last one is eval.json's "after" and equals a fresh evaluation of the final model."""
    out = tmp_path / "o"
    r = T.Run(build_config(causal(llama, text_data, out, eval_every=3, log_every=4)))
    result = r()
    lines = metrics_of(out)
    assert [(m["step"], "eval_loss" in m) for m in lines] == [
        (3, True), (4, False), (6, True), (8, False), (8, True)]
    evals = [m for m in lines if "eval_loss" in m]
    assert set(evals[0]) == {"step", "epoch", "eval_loss", "eval_perplexity"}
    assert evals[1]["epoch"] == 6 / 12  # 48 rows, batch 4
    after = json.loads((out / "eval.json").read_text())["after"]
    assert (evals[-1]["eval_loss"], evals[-1]["eval_perplexity"]) == (after["loss"],
                                                                     after["perplexity"])
    assert r.evaluate()["loss"] == after["loss"] == result["eval_after"]["loss"]
    assert len({m["eval_loss"] for m in evals}) == 3  # the model changed in between
    best = min(evals, key=lambda m: m["eval_loss"])
    assert result["best"] == dict(step=best["step"], metric="loss", value=best["eval_loss"],
                                  loaded=False, stopped_early=False)


def fake_evaluations(monkeypatch, values, metric="loss"):
    """Evaluation at step s reports values[s] as `metric` (training itself is real)."""
    def evaluate(self, dataset=None):
        return dict(loss=values[self.state.step] if metric == "loss" else 1.0,
                    perplexity=values[self.state.step] if metric == "perplexity" else 1.0,
                    tokens=1)
    monkeypatch.setattr(T.Run, "evaluate", evaluate)


@pytest.mark.parametrize("values, kw, stop, best", [
    # lower is better; patience 2: evaluations 3 and 4 do not improve on step 2
    ([9, 5, 4, 4, 6, 1, 1], dict(early_stopping_patience=2), 4, 2),
    # improvements of 0.05 do not beat the threshold 0.1: patience runs out, best still moves
    ([9, 1.0, 0.95, 0.9, 0.85, 0.8, 0.7], dict(early_stopping_patience=2,
                                                early_stopping_threshold=0.1), 3, 3),
    ([9, 1.0, 0.95, 0.9, 0.85, 0.8, 0.7], dict(early_stopping_patience=2,
                                                early_stopping_threshold=0.04), 6, 6),
    ([9, 5, 6, 7, 8, 9, 9], dict(), 6, 1),  # no patience: never stops
])
def test_early_stopping_and_best_step(llama, text_data, tmp_path, monkeypatch, values, kw,
                                      stop, best):
    fake_evaluations(monkeypatch, values)
    out = tmp_path / "o"
    r = run(causal(llama, text_data, out, eval_every=1, max_steps=6, log_every=4,
                   eval_data=text_data[1], **kw))
    assert r["steps"] == stop and len(r["losses"]) == stop
    assert r["best"] == dict(step=best, metric="loss", value=values[best], loaded=False,
                             stopped_early=stop < 6)
    steps = [(m["step"], "eval_loss" in m) for m in metrics_of(out)]
    train_steps = [s for s, is_eval in steps if not is_eval]
    assert train_steps == sorted({4, stop} & set(range(1, stop + 1)))  # the stop step is logged
    assert [s for s, is_eval in steps if is_eval] == list(range(1, stop + 1))


def test_greater_is_better_metric(bert, tmp_path, monkeypatch):
    rows = [{"text": r["text"], "label": ["a", "b"][i % 2]} for i, r in enumerate(sentences(16))]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    accuracy = [0, 0.5, 0.75, 0.5, 0.75, 0.7]
    monkeypatch.setattr(T.Run, "evaluate", lambda self, dataset=None: dict(
        loss=1.0 - accuracy[self.state.step] / 2, accuracy=accuracy[self.state.step],
        macro_f1=0.0))
    r = run(dict(model=bert, data=data, eval_data=data, task="seq-cls", output=str(tmp_path / "o"),
                 batch_size=4, max_steps=5, eval_every=1, early_stopping_patience=2,
                 metric_for_best="accuracy", dtype="fp32", progress=False, max_seq_len=16))
    assert (r["steps"], r["best"]["step"], r["best"]["value"]) == (4, 2, 0.75)


def test_best_checkpoint_is_kept_and_loaded_at_end(llama, text_data, tmp_path, monkeypatch):
    """Best at step 2: its checkpoint survives the rotation (newest two + the best) and
    its weights are the exported adapter, although training went on to step 6."""
    fake_evaluations(monkeypatch, [9, 5, 3, 4, 5, 6, 7])
    out = tmp_path / "o"
    r = run(causal(llama, text_data, out, eval_every=1, max_steps=6, save_every=1,
                   load_best_at_end=True, eval_data=text_data[1]))
    assert r["steps"] == 6 and r["best"]["step"] == 2 and r["best"]["loaded"]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == [
        "checkpoint-0000002", "checkpoint-0000005", "checkpoint-0000006"]
    best = T.read_checkpoint(out / "checkpoint-0000002")["trainable"]
    last = T.read_checkpoint(out / "checkpoint-0000006")["trainable"]
    adapter = load_file(out / "adapter_model.safetensors")
    name = next(n for n in best if "lora_A" in n)
    key = f"base_model.model.{name}"
    assert torch.equal(adapter[key], best[name]) and not torch.equal(adapter[key], last[name])
    assert json.loads((out / "eval.json").read_text())["best"] == dict(
        step=2, metric="loss", value=3, loaded=True, stopped_early=False)


def test_load_best_evaluates_the_best_weights(llama, text_data, tmp_path):
    """Real evaluations: eval.json "after" and "test" equal the best step's line."""
    out = tmp_path / "o"
    r = run(causal(llama, text_data, out, eval_every=1, max_steps=4, lr=0.3,
                   load_best_at_end=True, test_data=text_data[1]))
    evals = {m["step"]: m for m in metrics_of(out) if "eval_loss" in m}
    best = min(evals.values(), key=lambda m: m["eval_loss"])
    saved = json.loads((out / "eval.json").read_text())
    assert saved["best"]["step"] == best["step"] == r["best"]["step"]
    assert saved["after"]["loss"] == saved["test"]["loss"] == best["eval_loss"]
    assert saved["after"]["perplexity"] == best["eval_perplexity"]


@pytest.mark.parametrize("cut", [0, 1, 2, 3])
def test_resume_with_early_stopping_equals_uninterrupted(llama, text_data, tmp_path,
                                                         monkeypatch, cut):
    """SIGTERM in step cut+1: the checkpoint holds the evaluations and the early-stopping
    state; the resumed run writes the same metrics.jsonl, eval.json and adapter (cut 3:
    the interrupted run had already stopped early)."""
    fake_evaluations(monkeypatch, [9, 5, 3, 4, 5, 6, 7, 8, 9])
    kw = dict(eval_every=1, max_steps=8, log_every=2, grad_accum=2, lora_dropout=0.2,
              early_stopping_patience=2, load_best_at_end=True, eval_data=text_data[1])
    full = run(causal(llama, text_data, tmp_path / "full", **kw))
    assert full["steps"] == 4
    with monkeypatch.context() as m:
        interrupt_in_step(m, cut, "sigterm")
        with pytest.raises(KeyboardInterrupt):
            run(causal(llama, text_data, tmp_path / "split", **kw))
    resumed = run(causal(llama, text_data, tmp_path / "split", resume=True, **kw))
    assert resumed["losses"] == full["losses"]
    for name in ("metrics.jsonl", "eval.json", "adapter_model.safetensors"):
        assert (tmp_path / "split" / name).read_bytes() == (tmp_path / "full" / name).read_bytes()


@pytest.mark.parametrize("key, value, shown", [
    ("eval_every", 2, "eval_every 1 -> 2"),
    ("early_stopping_patience", 3, "early_stopping_patience None -> 3"),
    ("eval_batch_size", 4, "eval_batch_size 32 -> 4"),  # steers the stopping under eval_every
])
def test_resume_refuses_other_evaluation_settings(llama, text_data, tmp_path, key, value, shown):
    out = tmp_path / "o"
    kw = dict(eval_every=1, max_steps=2)
    run(causal(llama, text_data, out, **kw))
    with pytest.raises(ValueError, match=re.escape(shown)):
        run(causal(llama, text_data, out, resume=True, **{**kw, key: value}))


# --------------------------------------------------------------------------- test set
def test_test_data_classification_report(bert, tmp_path):
    """eval.json "test": accuracy / per-class scores / confusion equal a direct forward's."""
    rows = [{"text": ("wonderful " if i % 3 else "terrible ") + r["text"],
             "label": ["neg", "pos", "mid"][i % 3]} for i, r in enumerate(sentences(60))]
    train, test = (write_jsonl(tmp_path / f"{n}.jsonl", part)
                   for n, part in (("train", rows[:40]), ("test", rows[40:])))
    trained = T.Run(build_config(dict(
        model=bert, data=train, test_data=test, task="seq-cls", output=str(tmp_path / "o"),
        batch_size=8, max_steps=6, lr=5e-3, dtype="fp32", progress=False, max_seq_len=24)))
    report = trained()["eval_test"]
    assert json.loads((tmp_path / "o" / "eval.json").read_text())["test"] == report
    batch = D.collate(trained.test.examples, trained.tokenizer.pad_token_id)
    with torch.no_grad():
        pred = trained.model.eval()(input_ids=batch["input_ids"],
                                    attention_mask=batch["attention_mask"]).logits.argmax(-1)
    gold, names = batch["labels"].tolist(), trained.labels
    confusion = [[sum(g == i and p == j for g, p in zip(gold, pred.tolist())) for j in range(3)]
                 for i in range(3)]
    assert report["confusion"] == confusion
    assert report["accuracy"] == sum(confusion[i][i] for i in range(3)) / 20
    for i, name in enumerate(names):
        c = report["per_class"][name]
        predicted = sum(row[i] for row in confusion)
        assert c["support"] == sum(confusion[i])
        assert c["precision"] == (confusion[i][i] / predicted if predicted else 0.0)
        assert c["recall"] == confusion[i][i] / sum(confusion[i])


def test_token_cls_test_report_and_eval_only(bert, ner_data, tmp_path):
    """Entity scores of --test-data equal entity_report of a direct forward's tags, and
    --eval-only on the saved adapter reproduces the whole report; it writes only
    eval.json, config.yaml and the run marker."""
    out = tmp_path / "o"
    trained = T.Run(build_config(dict(
        model=bert, data=ner_data[0], test_data=ner_data[1], task="token-cls", output=str(out),
        batch_size=8, max_steps=8, lr=1e-2, dtype="fp32", progress=False)))
    report = trained()["eval_test"]
    batch = D.collate(trained.test.examples, trained.tokenizer.pad_token_id)
    with torch.no_grad():
        pred = trained.model.eval()(input_ids=batch["input_ids"],
                                    attention_mask=batch["attention_mask"]).logits.argmax(-1)
    names, gold_tags, pred_tags = trained.labels, [], []
    for g, p in zip(batch["labels"], pred):
        gold_tags.append([names[i] for i in g[g != -100].tolist()])
        pred_tags.append([names[i] for i in p[g != -100].tolist()])
    assert gold_tags == [r["tags"] for r in map(json.loads, open(ner_data[1]))]
    assert report["entities"] == entity_report(gold_tags, pred_tags)
    assert set(report["entities"]["per_type"]) <= {"CAP", "LONG"}
    assert report["entities"]["micro"]["support"] > 0

    again = run(dict(model=bert, adapter=str(out), eval_only=True, test_data=ner_data[1],
                     eval_data=ner_data[1], task="token-cls", output=str(tmp_path / "e"),
                     dtype="fp32", progress=False))
    assert again["test"] == again["eval"] == report
    assert json.loads((tmp_path / "e" / "eval.json").read_text()) == dict(eval=report, test=report)
    assert sorted(p.name for p in (tmp_path / "e").iterdir()) == [
        ".pyengine-run", "config.yaml", "eval.json"]


@pytest.mark.parametrize("case", ["no labels", "task mismatch", "missing adapter", "not empty"])
def test_eval_only_errors_write_nothing(bert, llama, text_data, ner_data, tmp_path, case):
    out = tmp_path / "out"
    cfg = dict(model=bert, eval_only=True, test_data=ner_data[1], task="token-cls",
               output=str(out), progress=False)
    if case == "task mismatch":  # a causal-lm adapter evaluated as a classifier
        adapter = tmp_path / "lm"
        run(causal(llama, text_data, adapter, max_steps=1, eval_data=None))
        cfg.update(model=llama, adapter=str(adapter))
        message = r"--eval-only: .*lm is a causal-lm model, not --task token-cls"
    elif case == "missing adapter":
        cfg.update(adapter=str(tmp_path / "nowhere"))
        message = r"nowhere/adapter_config.json does not exist"
    elif case == "not empty":
        out.mkdir()
        (out / "mine.txt").write_text("keep")
        message = r"--output .*out is not empty \(holds mine.txt\)"
    else:
        message = r"--eval-only: no class names for .*; pass --labels"
    before = snapshot(tmp_path)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        run(cfg)
    assert snapshot(tmp_path) == before


# --------------------------------------------------------------------------- tensorboard
def scalars_of(directory):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(directory))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def expected_scalars(out):
    f32 = lambda v: float(torch.tensor(v, dtype=torch.float32))  # noqa: E731
    want = {}
    for m in metrics_of(out):
        names = (("eval/loss", "eval_loss"), ("eval/perplexity", "eval_perplexity")) \
            if "eval_loss" in m else (("train/loss", "loss"), ("train/lr", "lr"),
                                      ("train/grad_norm", "grad_norm"))
        for tag, key in names:
            want.setdefault(tag, []).append((m["step"], f32(m[key])))
    return want


def test_tensorboard_equals_metrics_and_resume_replaces_the_lost_steps(llama, text_data, tmp_path):
    """A run that logged steps 3-4 but lost its last checkpoint resumes from step 2: the
    event files then hold each step once, with the values of metrics.jsonl."""
    import shutil
    out = tmp_path / "o"
    kw = dict(max_steps=4, log_every=1, eval_every=2, save_every=2, report_to="tensorboard")
    run(causal(llama, text_data, out, **kw))
    assert scalars_of(out / "tensorboard") == expected_scalars(out)
    shutil.rmtree(out / "checkpoint-0000004")  # as if killed after logging step 4
    run(causal(llama, text_data, out, resume=True, **kw))
    got = scalars_of(out / "tensorboard")
    assert [s for s, _ in got["train/loss"]] == [1, 2, 3, 4]
    assert got == expected_scalars(out)


def test_missing_tensorboard_is_an_error_before_writing(llama, text_data, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(ValueError, match=r"--report-to tensorboard needs the tensorboard package"):
        run(causal(llama, text_data, tmp_path / "o", report_to="tensorboard"))
    assert not (tmp_path / "o").exists()


def test_report_text_lists_classes_and_entities():
    """The summary's test report: totals, then one line per class and per entity type."""
    s = lambda p, r, f, n: dict(precision=p, recall=r, f1=f, support=n)  # noqa: E731
    report = dict(loss=0.5, accuracy=0.75, macro_f1=0.5, per_class={
        "B-X": s(1.0, 0.5, 2 / 3, 2), "O": s(0.5, 1.0, 2 / 3, 2)},
        entities=dict(per_type={"X": s(1.0, 0.5, 2 / 3, 2)}, micro=s(1.0, 0.5, 2 / 3, 2),
                      macro=s(1.0, 0.5, 2 / 3, 2)))
    assert T.report_text(report, "token-cls").splitlines() == [
        "accuracy 0.750, macro F1 0.500, loss 0.5000, entity F1 0.667",
        "    B-X                  precision 1.000  recall 0.500  F1 0.667  support 2",
        "    O                    precision 0.500  recall 1.000  F1 0.667  support 2",
        "  entities:",
        "    X                    precision 1.000  recall 0.500  F1 0.667  support 2",
        "    micro avg            precision 1.000  recall 0.500  F1 0.667  support 2",
        "    macro avg            precision 1.000  recall 0.500  F1 0.667  support 2"]


def test_eval_only_on_a_full_finetune_uses_its_id2label(bert, tmp_path):
    """Class names from the saved config.json (given in unsorted order): --eval-only
    reproduces the training run's test report."""
    rows = [{"text": r["text"], "label": ["zeta", "alpha", "mid"][i % 3]}
            for i, r in enumerate(sentences(30))]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    r = run(dict(model=bert, data=data, test_data=data, task="seq-cls", method="full",
                 labels=["zeta", "alpha", "mid"], output=str(tmp_path / "o"), batch_size=8,
                 max_steps=3, lr=1e-2, dtype="fp32", progress=False, max_seq_len=24))
    again = run(dict(model=str(tmp_path / "o"), eval_only=True, test_data=data, task="seq-cls",
                     output=str(tmp_path / "e"), dtype="fp32", progress=False, max_seq_len=24))
    assert list(again["test"]["per_class"]) == ["zeta", "alpha", "mid"]
    assert again["test"] == r["eval_test"]
