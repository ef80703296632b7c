"""pyengine.models: losses against transformers' own, the classification report."""
from __future__ import annotations

import pytest
import torch

from pyengine import data as D
from pyengine import models as M
from tests.tiny_hf import make_bert, make_llama, sentences, write_jsonl

X = D.IGNORE


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    d = make_llama(tmp_path_factory.mktemp("llama"))
    tok = M.load_tokenizer(d)
    return M.load_model(d, "causal-lm", None, tok.pad_token_id).eval(), tok


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    return make_bert(tmp_path_factory.mktemp("bert"))


def test_classification_report_on_an_asymmetric_confusion_matrix():
    confusion = torch.tensor([[5, 1, 0],   # rows: true class, columns: predicted
                              [2, 3, 1],
                              [0, 4, 6]])
    r = M.classification_report(confusion, ["a", "b", "c"])
    want = {"a": (5 / 7, 5 / 6, 10 / 13, 6), "b": (3 / 8, 3 / 6, 6 / 14, 6),
            "c": (6 / 7, 6 / 10, 12 / 17, 10)}
    for name, (precision, recall, f1, support) in want.items():
        got = r["per_class"][name]
        assert got["support"] == support
        assert (got["precision"], got["recall"], got["f1"]) == pytest.approx(
            (precision, recall, f1), rel=1e-12)
    assert r["accuracy"] == pytest.approx(14 / 22, rel=1e-12)
    assert r["macro_f1"] == pytest.approx((10 / 13 + 6 / 14 + 12 / 17) / 3, rel=1e-12)
    assert r["examples"] == 22


class FixedClassifier(torch.nn.Module):
    """Predicts class input_ids[:, 0] for every example (a stand-in with known predictions)."""

    def __init__(self, classes):
        super().__init__()
        self.classes = classes

    def forward(self, input_ids, attention_mask):
        from types import SimpleNamespace
        logits = torch.nn.functional.one_hot(input_ids[:, 0], self.classes) * 5.0
        return SimpleNamespace(logits=logits)


def test_evaluate_confusion_is_true_by_predicted():
    """evaluate() counts confusion[true, predicted]: on asymmetric pairs every per-class
    precision and recall equals the hand count (a transposed matrix swaps them)."""
    pairs = [(0, 0)] * 3 + [(0, 1)] * 2 + [(1, 1)] + [(2, 1)] * 4 + [(2, 2)]  # (true, predicted)
    batches = [dict(input_ids=torch.tensor([[p, 0] for _, p in pairs[s:s + 4]]),
                    attention_mask=torch.ones(len(pairs[s:s + 4]), 2, dtype=torch.long),
                    labels=torch.tensor([t for t, _ in pairs[s:s + 4]]))
               for s in range(0, len(pairs), 4)]
    r = M.evaluate("seq-cls", FixedClassifier(3), batches, torch.float32, ["a", "b", "c"])
    got = {n: (c["precision"], c["recall"], c["support"]) for n, c in r["per_class"].items()}
    assert got == {"a": (1.0, 3 / 5, 5), "b": (1 / 7, 1.0, 1), "c": (1.0, 1 / 5, 5)}
    assert r["accuracy"] == 5 / 11 and r["examples"] == 11


def causal_batch(tok, tmp_path):
    """Alpaca rows (prompt unlabelled) of different lengths and a plain text row (every
    token labelled, the first one too): padding and ignored targets."""
    rows = [{"instruction": r["text"], "output": r["text"][: 8 + 9 * i]}
            for i, r in enumerate(sentences(3))] + [{"text": sentences(4)[3]["text"]}]
    return D.Dataset(write_jsonl(tmp_path / "a.jsonl", rows), "causal-lm", tok, 512).examples


def test_causal_lm_loss_equals_transformers_loss_also_accumulated(llama, tmp_path):
    model, tok = llama
    examples = causal_batch(tok, tmp_path)
    whole = D.collate(examples, tok.pad_token_id)
    with torch.no_grad():
        theirs = model(**whole).loss  # HF shifts the labels and averages non-ignored targets
        ours = M.training_loss("causal-lm", model, whole,
                               M.count_items("causal-lm", whole["labels"]), torch.float32)
        parts = [D.collate(examples[:1], tok.pad_token_id), D.collate(examples[1:], tok.pad_token_id)]
        n = sum(M.count_items("causal-lm", b["labels"]) for b in parts)
        accumulated = sum(M.training_loss("causal-lm", model, b, n, torch.float32) for b in parts)
        ev = M.evaluate("causal-lm", model, parts, torch.float32)
    torch.testing.assert_close(ours, theirs, rtol=2e-6, atol=0)
    torch.testing.assert_close(accumulated, theirs, rtol=2e-6, atol=0)
    assert ev["tokens"] == int((whole["labels"][:, 1:] != X).sum())
    assert ev["loss"] == pytest.approx(float(theirs), rel=2e-6)


@pytest.mark.parametrize("task", ["seq-cls", "token-cls"])
def test_classification_loss_equals_transformers_loss(bert_dir, tmp_path, task):
    tok = M.load_tokenizer(bert_dir)
    if task == "seq-cls":
        rows = [{"text": r["text"], "label": ["a", "b", "c"][i % 3]}
                for i, r in enumerate(sentences(5))]
    else:
        rows = [{"tokens": r["text"].split()[:6], "tags": ["a", "b", "c", "a", "b", "c"][
            :len(r["text"].split()[:6])]} for r in sentences(5)]
    ds = D.Dataset(write_jsonl(tmp_path / "c.jsonl", rows), task, tok, 64)
    torch.manual_seed(0)
    model = M.load_model(bert_dir, task, ds.labels, tok.pad_token_id).eval()
    whole = D.collate(ds.examples, tok.pad_token_id)
    with torch.no_grad():
        theirs = model(**whole).loss
        parts = [D.collate(ds.examples[:2], tok.pad_token_id),
                 D.collate(ds.examples[2:], tok.pad_token_id)]
        n = sum(M.count_items(task, b["labels"]) for b in parts)
        accumulated = sum(M.training_loss(task, model, b, n, torch.float32) for b in parts)
    torch.testing.assert_close(accumulated, theirs, rtol=2e-6, atol=0)
