"""JSONL loading, exact token / label vectors, truncation, packing and collation."""
from __future__ import annotations

import pytest

from pyengine import data as D
from tests.tiny_hf import bert_tokenizer, llama_tokenizer, write_jsonl

CHAT_TEMPLATE = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}[assistant] {% endif %}")
X = D.IGNORE
CHAT = [{"role": "system", "content": "Be brief"},
        {"role": "user", "content": "How was the film"},
        {"role": "assistant", "content": "Very good"},
        {"role": "user", "content": "And the soup"},
        {"role": "assistant", "content": "Cold and bland"}]


@pytest.fixture(scope="module")
def ltok():
    return llama_tokenizer()


@pytest.fixture(scope="module")
def bos_tok():
    return llama_tokenizer(add_bos=True)


@pytest.fixture(scope="module")
def btok():
    return bert_tokenizer()


def enc(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def one(tmp_path, tok, row, task="causal-lm", **kw):
    return D.Dataset(write_jsonl(tmp_path / "d.jsonl", [row]), task, tok, 512, **kw).examples[0]


def expect(tok, pieces):
    """input_ids and labels of (text, trained?) pieces, each tokenised on its own."""
    ids, labels = [], []
    for piece, trained in pieces:
        t = piece if isinstance(piece, list) else enc(tok, piece)
        ids += t
        labels += t if trained else [X] * len(t)
    return ids, labels


@pytest.mark.parametrize("with_bos", [False, True])
def test_alpaca_exact_vectors(ltok, bos_tok, tmp_path, with_bos):
    tok = bos_tok if with_bos else ltok
    ex = one(tmp_path, tok, {"instruction": "Describe the soup", "input": "tomato",
                             "output": "Rich and warm"})
    prompt = ("Below is an instruction that describes a task, paired with an input that "
              "provides further context. Write a response that appropriately completes the "
              "request.\n\n### Instruction:\nDescribe the soup\n\n### Input:\ntomato\n\n"
              "### Response:\n")
    bos = [tok.bos_token_id] if with_bos else []
    assert (ex.input_ids, ex.labels) == expect(tok, [
        (bos, False), (prompt, False), ("Rich and warm", True), ([tok.eos_token_id], True)])
    ex = one(tmp_path, ltok, {"instruction": "Name a film", "output": "The documentary"})
    prompt = ("Below is an instruction that describes a task. Write a response that "
              "appropriately completes the request.\n\n### Instruction:\nName a film\n\n"
              "### Response:\n")
    assert (ex.input_ids, ex.labels) == expect(ltok, [
        (prompt, False), ("The documentary", True), ([ltok.eos_token_id], True)])


def test_chat_with_the_tokenizers_template_exact_vectors(tmp_path):
    tok = llama_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    ex = one(tmp_path, tok, {"messages": CHAT})
    assert (ex.input_ids, ex.labels) == expect(tok, [
        ("[system] Be brief\n[user] How was the film\n[assistant] ", False),
        ("Very good\n", True), ("[user] And the soup\n[assistant] ", False),
        ("Cold and bland\n", True)])
    assert tok.chat_template == CHAT_TEMPLATE  # the tokenizer's own template is kept


def test_chat_fallback_template_is_set_on_the_tokenizer(tmp_path):
    """The fallback is a real chat_template: saved with the tokenizer, `infer --chat`
    renders the training prompt exactly."""
    from pyengine.infer import encode_prompt
    tok = llama_tokenizer()
    assert not tok.chat_template
    ex = one(tmp_path, tok, {"messages": CHAT})
    assert (ex.input_ids, ex.labels) == expect(tok, [
        ("<|system|>\nBe brief</s>\n<|user|>\nHow was the film</s>\n<|assistant|>\n", False),
        ("Very good</s>", True), ("\n<|user|>\nAnd the soup</s>\n<|assistant|>\n", False),
        ("Cold and bland</s>", True)])
    assert tok.chat_template == D.FALLBACK_CHAT_TEMPLATE
    assert encode_prompt(tok, "How was the film", chat=True) == enc(
        tok, "<|user|>\nHow was the film</s>\n<|assistant|>\n")
    saved = tmp_path / "tok"
    tok.save_pretrained(saved)
    from transformers import AutoTokenizer
    assert AutoTokenizer.from_pretrained(saved).chat_template == D.FALLBACK_CHAT_TEMPLATE


@pytest.mark.parametrize("with_bos", [False, True])
def test_plain_text_is_encoded_as_infer_encodes_a_prompt(ltok, bos_tok, tmp_path, with_bos):
    from pyengine.infer import encode_prompt
    tok = bos_tok if with_bos else ltok
    ex = one(tmp_path, tok, {"text": "The soup was cold"})
    want = ([tok.bos_token_id] if with_bos else []) + enc(tok, "The soup was cold") \
        + [tok.eos_token_id]
    assert ex.input_ids == want and ex.labels == want
    assert ex.input_ids == encode_prompt(tok, "The soup was cold") + [tok.eos_token_id]


def test_token_cls_labels_first_sub_token(btok, tmp_path):
    words = ["unbelievably", "good", "film"]
    ds = D.Dataset(write_jsonl(tmp_path / "k.jsonl", [
        {"tokens": words, "tags": ["ADV", "ADJ", "NOUN"]},
        {"tokens": ["bad"], "tags": ["ADJ"]}]), "token-cls", btok, 512)
    assert ds.labels == ["ADJ", "ADV", "NOUN"]
    ex = ds.examples[0]
    enc_ = btok(words, is_split_into_words=True)
    assert len(enc_["input_ids"]) > len(words) + 2  # words really split into sub-tokens
    want, seen = [], set()
    for w in enc_.word_ids():
        want.append(D.IGNORE if w is None or w in seen else [1, 0, 2][w])
        if w is not None:
            seen.add(w)
    assert ex.labels == want and ex.input_ids == enc_["input_ids"]


def test_seq_cls_label_names_and_indices(btok, tmp_path):
    ds = D.Dataset(write_jsonl(tmp_path / "s.jsonl", [
        {"text": "good", "label": "positive"}, {"text": "bad", "label": "negative"}]),
        "seq-cls", btok, 512)
    assert ds.labels == ["negative", "positive"] and [e.labels for e in ds.examples] == [1, 0]
    ds = D.Dataset(write_jsonl(tmp_path / "n.jsonl", [
        {"text": "a", "label": 10}, {"text": "b", "label": 2}]), "seq-cls", btok, 512)
    assert ds.labels == ["2", "10"]  # numeric names sort numerically
    assert [e.labels for e in ds.examples] == [1, 0]


def test_int_labels_index_the_given_class_names(btok, tmp_path):
    rows = [{"text": "good", "label": 1}, {"text": "bad", "label": 0},
            {"text": "meh", "label": "neutral"}]
    ds = D.Dataset(write_jsonl(tmp_path / "s.jsonl", rows), "seq-cls", btok, 512,
                   ["negative", "positive", "neutral"], index_labels=True)
    assert [e.labels for e in ds.examples] == [1, 0, 2]
    ds = D.Dataset(write_jsonl(tmp_path / "t.jsonl", [{"tokens": ["a", "b"], "tags": [1, "X"]}]),
                   "token-cls", btok, 512, ["X", "Y"], index_labels=True)
    assert [t for t in ds.examples[0].labels if t != X] == [1, 0]
    with pytest.raises(ValueError, match=r"s.jsonl:1: label 3 is not an index into the class "
                                         r"names \['negative', 'positive'\] \(0..1\)"):
        D.Dataset(write_jsonl(tmp_path / "s.jsonl", [{"text": "a", "label": 3}]), "seq-cls",
                  btok, 512, ["negative", "positive"], index_labels=True)


def test_a_sequence_of_exactly_max_seq_len_is_not_truncated(btok, tmp_path):
    rows = [{"text": "the film was fine", "label": "a"}, {"text": "short", "label": "b"}]
    full = btok(rows[0]["text"])["input_ids"]
    ds = D.Dataset(write_jsonl(tmp_path / "s.jsonl", rows), "seq-cls", btok, len(full))
    assert ds.truncated == 0 and ds.examples[0].input_ids == full


def test_truncation_is_counted_and_keeps_sep(btok, tmp_path, caplog):
    rows = [{"text": "the film " * 30, "label": "a"}, {"text": "short", "label": "b"}]
    with caplog.at_level("WARNING"):
        ds = D.Dataset(write_jsonl(tmp_path / "s.jsonl", rows), "seq-cls", btok, 12)
    assert ds.truncated == 1 and "truncated 1 of 2 sequences" in caplog.text
    full = btok("the film " * 30)["input_ids"]
    assert ds.examples[0].input_ids == full[:11] + [btok.sep_token_id]


def test_packing_masks_example_boundaries():
    exs = [D.Example([1, 5, 6], [1, 5, 6]), D.Example([1, 7], [1, 7]), D.Example([1, 8, 9, 4], [1, 8, 9, 4])]
    rows = D.pack(exs, 6)
    assert [r.input_ids for r in rows] == [[1, 5, 6, 1, 7], [1, 8, 9, 4]]
    assert [r.labels for r in rows] == [[X, 5, 6, X, 7], [X, 8, 9, 4]]


def test_packing_fills_a_row_to_exactly_max_len():
    """An example that fits exactly (row length == max_len) joins the row; one token more
    starts a new row."""
    exs = [D.Example([1, 5, 6], [1, 5, 6]), D.Example([1, 7, 8], [1, 7, 8]), D.Example([1], [1])]
    rows = D.pack(exs, 6)
    assert [r.input_ids for r in rows] == [[1, 5, 6, 1, 7, 8], [1]]
    assert [r.labels for r in rows] == [[X, 5, 6, X, 7, 8], [X]]


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


# --------------------------------------------------------------------------- bad files
@pytest.mark.parametrize("content, message", [
    (b'{"text": "a"}\n{"text": "b",}\n', r"x.jsonl:2: malformed JSON: .* \(column 14\)"),
    (b'{"text": "a"}\n{"text": "broken"\n', r"x.jsonl:2: malformed JSON: .* \(column 18\)"),
    (b'{"text": "a"}\n{"text": "caf\xe9"}\n', r"x.jsonl:2: not valid UTF-8 at byte 14 .*0xe9"),
    (b'{"text": "a", "label": "pos"}\n', r"x.jsonl:1: field 'label': labelled data is for "
                                         r"--task seq-cls"),
    (b'{"tokens": ["a"], "tags": ["X"]}\n', r"x.jsonl:1: field 'tags': .*--task token-cls"),
])
def test_bad_lines_report_file_line_and_column(tmp_path, ltok, content, message):
    p = tmp_path / "x.jsonl"
    p.write_bytes(content)
    with pytest.raises(ValueError, match=message):
        D.Dataset(str(p), "causal-lm", ltok, 512)


def test_utf8_bom_is_accepted(tmp_path):
    p = tmp_path / "bom.jsonl"
    p.write_bytes(b'\xef\xbb\xbf{"text": "caf\xc3\xa9"}\r\n{"text": "b"}\n')
    assert [r.value for r in D.read_jsonl(str(p))] == [{"text": "café"}, {"text": "b"}]
    assert [r.where for r in D.read_jsonl(str(p))] == [f"{p}:1", f"{p}:2"]


def test_data_directory_is_refused(tmp_path):
    with pytest.raises(ValueError, match=f"data file {tmp_path} is a directory"):
        D.read_jsonl(str(tmp_path))
