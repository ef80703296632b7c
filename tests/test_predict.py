"""python -m pyengine.predict on tiny fine-tuned BERT classifiers (adapter and full)."""
from __future__ import annotations

import json
import re

import pytest
import torch

from pyengine import data as D
from pyengine.finetune import run
from pyengine.predict import load_classifier, main
from tests.tiny_hf import sentences, write_jsonl

pytestmark = pytest.mark.usefixtures("one_thread")


def train(bert, directory, task, rows, **kw):
    data = write_jsonl(directory / "train.jsonl", rows)
    run(dict(model=bert, data=data, task=task, output=str(directory / "out"), batch_size=8,
             max_steps=3, lr=1e-2, dtype="fp32", progress=False, max_seq_len=32, **kw))
    return str(directory / "out")


@pytest.fixture(scope="module")
def seq_cls(bert, tmp_path_factory):
    """An adapter over three classes named in an unsorted order (labels.json decides)."""
    rows = [{"text": r["text"], "label": ["zeta", "alpha", "mid"][i % 3]}
            for i, r in enumerate(sentences(24))]
    return train(bert, tmp_path_factory.mktemp("seq"), "seq-cls", rows,
                 labels=["zeta", "alpha", "mid"])


@pytest.fixture(scope="module")
def token_cls(bert, tmp_path_factory):
    rows = [{"tokens": r["text"].split(), "tags": ["L" if len(w) > 4 else "S"
                                                   for w in r["text"].split()]}
            for r in sentences(24)]
    return train(bert, tmp_path_factory.mktemp("tok"), "token-cls", rows, method="full")


def direct_logits(model, tokenizer, examples):
    batch = D.collate(examples, tokenizer.pad_token_id)
    with torch.no_grad():
        return model(input_ids=batch["input_ids"],
                     attention_mask=batch["attention_mask"]).logits.float(), batch


def read_lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("batch_size", [1, 3, 7])
def test_seq_cls_probabilities_are_the_softmax_of_a_direct_forward(bert, seq_cls, tmp_path,
                                                                   batch_size):
    """7 rows (one blank line skipped, extra keys ignored), batches of 1 / 3 / 7: each
    output line is its row's softmax, exactly, in order, and the label is the argmax."""
    texts = [r["text"] for r in sentences(31)[24:31]]
    data = tmp_path / "in.jsonl"
    data.write_text("".join(json.dumps({"text": t, "label": "zeta", "id": i}) + "\n"
                            + ("\n" if i == 2 else "") for i, t in enumerate(texts)))
    out = tmp_path / "pred.jsonl"
    assert main(["--model", bert, "--adapter", seq_cls, "--data", str(data), "--output",
                 str(out), "--batch-size", str(batch_size)]) == 0
    got = read_lines(out)
    task, labels, tok, model = load_classifier(bert, seq_cls)
    assert (task, labels) == ("seq-cls", ["zeta", "alpha", "mid"])
    for start in range(0, len(texts), batch_size):  # the batches predict ran, padded alike
        chunk = [D.Example(tok(t)["input_ids"], 0) for t in texts[start:start + batch_size]]
        probs = torch.softmax(direct_logits(model, tok, chunk)[0], -1).tolist()
        for row, p in zip(got[start:start + batch_size], probs):
            assert row == dict(label=labels[p.index(max(p))], probabilities=dict(zip(labels, p)))
    assert len(got) == len(texts) == 7


def test_token_cls_tags_per_word_from_a_full_finetune(bert, token_cls, tmp_path, capsys):
    """A fully fine-tuned directory (config id2label); stdout when no --output; one tag
    per word, taken at the word's first sub-token."""
    rows = [{"tokens": r["text"].split()} for r in sentences(28)[24:28]]
    data = write_jsonl(tmp_path / "in.jsonl", rows)
    assert main(["--model", token_cls, "--data", data, "--batch-size", "3"]) == 0
    got = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    task, labels, tok, model = load_classifier(token_cls)
    assert (task, labels) == ("token-cls", ["L", "S"])
    for start in (0, 3):
        examples = []
        for r in rows[start:start + 3]:
            enc = tok(r["tokens"], is_split_into_words=True)
            words = enc.word_ids()
            firsts = [-100 if w is None or (i and words[i - 1] == w) else 0
                      for i, w in enumerate(words)]
            examples.append(D.Example(enc["input_ids"], firsts))
        logits, batch = direct_logits(model, tok, examples)
        for row, first, pred in zip(got[start:start + 3], batch["labels"], logits.argmax(-1)):
            assert row == dict(tags=[labels[i] for i in pred[first == 0].tolist()])
    assert [len(r["tags"]) for r in got] == [len(r["tokens"]) for r in rows]


def err_of(capsys):
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.splitlines()[-1]


@pytest.mark.parametrize("case", ["bad row", "wrong field", "exists", "causal-lm", "no labels"])
def test_errors_exit_2_and_keep_files(bert, seq_cls, tmp_path, capsys, case):
    data = write_jsonl(tmp_path / "in.jsonl", [{"text": "a fine day"}, {"text": 3}])
    out = tmp_path / "pred.jsonl"
    argv = ["--model", bert, "--adapter", seq_cls, "--data", data, "--output", str(out)]
    message = r"error: .*in.jsonl:2: field 'text' must be str, got int"
    if case == "wrong field":
        write_jsonl(tmp_path / "in.jsonl", [{"tokens": ["a"]}])
        message = r"error: .*in.jsonl:1: missing field 'text' \(seq-cls prediction needs text\)"
    elif case == "exists":
        write_jsonl(tmp_path / "in.jsonl", [{"text": "a"}])
        out.write_text("mine\n")
        message = r"error: --output .*pred.jsonl exists; pass --force to overwrite it"
    elif case == "causal-lm":
        argv[1:4] = [bert, "--adapter", str(tmp_path)]
        (tmp_path / "adapter_config.json").write_text(json.dumps({"task_type": "CAUSAL_LM"}))
        message = r"error: .* is not a seq-cls / token-cls classifier \(task causal-lm\); .*"
    elif case == "no labels":
        argv[2:4] = []
        message = r"error: .*bert\d* is not a seq-cls / token-cls classifier \(task unknown\); .*"
    before = out.read_text() if out.exists() else None
    assert main(argv) == 2
    assert re.fullmatch(message, err_of(capsys))
    assert (out.read_text() if out.exists() else None) == before


def test_force_overwrites(bert, seq_cls, tmp_path):
    data = write_jsonl(tmp_path / "in.jsonl", [{"text": "a fine day"}])
    out = tmp_path / "pred.jsonl"
    out.write_text("old\n")
    assert main(["--model", bert, "--adapter", seq_cls, "--data", data, "--output", str(out),
                 "--force"]) == 0
    assert list(read_lines(out)[0]) == ["label", "probabilities"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "pred.jsonl"]


def test_token_cls_row_longer_than_max_seq_len(bert, token_cls, tmp_path, capsys):
    data = write_jsonl(tmp_path / "in.jsonl", [{"tokens": ["a"]}, {"tokens": ["a", "b", "c"]}])
    assert main(["--model", token_cls, "--data", data, "--max-seq-len", "4"]) == 2
    assert re.fullmatch(r"error: .*in.jsonl:2: 5 tokens, more than --max-seq-len 4",
                        err_of(capsys))
