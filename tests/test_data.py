"""JSONL loading, loss masks, truncation, packing and collation."""
from __future__ import annotations

import pytest

from pyengine import data as D
from tests.tiny_hf import bert_tokenizer, llama_tokenizer, write_jsonl

CHAT_TEMPLATE = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}[assistant] {% endif %}")


@pytest.fixture(scope="module")
def ltok():
    return llama_tokenizer()


@pytest.fixture(scope="module")
def btok():
    return bert_tokenizer()


def labelled_text(tok, ex):
    return tok.decode([i for i, l in zip(ex.input_ids, ex.labels) if l != D.IGNORE],
                      skip_special_tokens=True)


def test_alpaca_trains_on_the_response_only(ltok, tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [
        {"instruction": "Describe the soup", "input": "tomato", "output": "Rich and warm"},
        {"instruction": "Name a film", "output": "The documentary"}])
    ds = D.Dataset(path, "causal-lm", ltok, 512)
    for ex, want in zip(ds.examples, ["Rich and warm", "The documentary"]):
        assert labelled_text(ltok, ex) == want
        assert ex.labels[-1] == ltok.eos_token_id
        assert ex.input_ids[0] == ltok.bos_token_id and ex.labels[0] == D.IGNORE
    assert "tomato" in ltok.decode(ds.examples[0].input_ids)


@pytest.mark.parametrize("template", [None, CHAT_TEMPLATE])
def test_chat_trains_on_assistant_turns_only(ltok, tmp_path, template):
    ltok.chat_template = template
    try:
        path = write_jsonl(tmp_path / "c.jsonl", [{"messages": [
            {"role": "system", "content": "Be brief"},
            {"role": "user", "content": "How was the film"},
            {"role": "assistant", "content": "Very good"},
            {"role": "user", "content": "And the soup"},
            {"role": "assistant", "content": "Cold and bland"}]}])
        ex = D.Dataset(path, "causal-lm", ltok, 512).examples[0]
    finally:
        ltok.chat_template = None
    text = labelled_text(ltok, ex)
    for said in ("Very good", "Cold and bland"):
        assert said in text
    for not_trained in ("Be brief", "How was the film", "And the soup", "user", "system"):
        assert not_trained not in text
    assert len(ex.input_ids) == len(ex.labels)


def test_plain_text_labels_everything(ltok, tmp_path):
    ex = D.Dataset(write_jsonl(tmp_path / "t.jsonl", [{"text": "The soup was cold"}]),
                   "causal-lm", ltok, 512).examples[0]
    assert ex.labels == ex.input_ids
    assert ex.input_ids[0] == ltok.bos_token_id and ex.input_ids[-1] == ltok.eos_token_id


def test_token_cls_labels_first_sub_token(btok, tmp_path):
    words = ["unbelievably", "good", "film"]
    ds = D.Dataset(write_jsonl(tmp_path / "k.jsonl", [
        {"tokens": words, "tags": ["ADV", "ADJ", "NOUN"]},
        {"tokens": ["bad"], "tags": ["ADJ"]}]), "token-cls", btok, 512)
    assert ds.labels == ["ADJ", "ADV", "NOUN"]
    ex = ds.examples[0]
    enc = btok(words, is_split_into_words=True)
    assert len(enc["input_ids"]) > len(words) + 2  # words really split into sub-tokens
    want, seen = [], set()
    for w in enc.word_ids():
        want.append(D.IGNORE if w is None or w in seen else [1, 0, 2][w])
        if w is not None:
            seen.add(w)
    assert ex.labels == want


def test_seq_cls_label_names_and_indices(btok, tmp_path):
    ds = D.Dataset(write_jsonl(tmp_path / "s.jsonl", [
        {"text": "good", "label": "positive"}, {"text": "bad", "label": "negative"}]),
        "seq-cls", btok, 512)
    assert ds.labels == ["negative", "positive"] and [e.labels for e in ds.examples] == [1, 0]
    ds = D.Dataset(write_jsonl(tmp_path / "n.jsonl", [
        {"text": "a", "label": 10}, {"text": "b", "label": 2}]), "seq-cls", btok, 512)
    assert ds.labels == ["2", "10"]  # numeric names sort numerically


def test_truncation_is_counted_and_keeps_sep(btok, tmp_path, caplog):
    rows = [{"text": "the film " * 30, "label": "a"}, {"text": "short", "label": "b"}]
    with caplog.at_level("WARNING"):
        ds = D.Dataset(write_jsonl(tmp_path / "s.jsonl", rows), "seq-cls", btok, 12)
    assert ds.truncated == 1 and "truncated 1 of 2 sequences" in caplog.text
    assert len(ds.examples[0].input_ids) == 12 and ds.examples[0].input_ids[-1] == btok.sep_token_id


def test_packing_masks_example_boundaries():
    exs = [D.Example([1, 5, 6], [1, 5, 6]), D.Example([1, 7], [1, 7]), D.Example([1, 8, 9, 4], [1, 8, 9, 4])]
    rows = D.pack(exs, 6)
    assert [r.input_ids for r in rows] == [[1, 5, 6, 1, 7], [1, 8, 9, 4]]
    assert rows[0].labels == [D.IGNORE, 5, 6, D.IGNORE, 7]


def test_collate_pads_right():
    b = D.collate([D.Example([3, 4, 5], [3, 4, 5]), D.Example([6], [D.IGNORE])], pad_id=0)
    assert b["input_ids"].tolist() == [[3, 4, 5], [6, 0, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert b["labels"].tolist() == [[3, 4, 5], [D.IGNORE] * 3]
    assert D.collate([D.Example([3], 1), D.Example([4, 5], 0)], 0)["labels"].tolist() == [1, 0]


def test_epoch_order_is_a_seeded_permutation():
    a = D.epoch_order(50, seed=3, epoch=1)
    assert sorted(a) == list(range(50)) and a == D.epoch_order(50, 3, 1)
    assert a != D.epoch_order(50, 3, 2) and a != D.epoch_order(50, 4, 1)


def test_malformed_lines_report_file_and_line(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text('{"text": "a"}\n{"text": "b",}\n')
    with pytest.raises(ValueError, match=r"x.jsonl:2: malformed JSON"):
        D.read_jsonl(str(p))
