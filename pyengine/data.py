"""JSONL datasets for fine-tuning: loading with validation, tokenisation, packing,
batching and collation.

Formats (one JSON object per line; blank lines are skipped):
  causal-lm  {"text"} | alpaca {"instruction", "input"?, "output"} |
             chat {"messages": [{"role", "content"}, ...]}
  seq-cls    {"text", "label"}            label: class name (str) or index (int)
  token-cls  {"tokens": [...], "tags": [...]}   one tag name per token
Every record is checked before any training: a malformed line or a missing / mistyped
field raises ValueError("<file>:<line>: <what is wrong>").  Labels are -100 where no loss
is taken (prompts, padding, non-first sub-tokens).

Causal-lm loss masks: alpaca trains on the response only; chat trains on the assistant
turns only.  Chat uses the tokenizer's chat template when it has one, else this
documented template:  "<|{role}|>\\n{content}{eos}\\n" per message (the assistant turns'
content + eos are the labelled tokens).
"""
from __future__ import annotations

import codecs
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger("pyengine.data")
IGNORE = -100
ALPACA_PROMPT = ("Below is an instruction that describes a task{ctx}. Write a response that "
                 "appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n"
                 "{input}### Response:\n")
FALLBACK_CHAT_TEMPLATE = (  # newlines as {{ '\n' }}: HF renders templates with trim_blocks
    "{% for m in messages %}{% if not loop.first %}{{ '\\n' }}{% endif %}"
    "<|{{ m['role'] }}|>{{ '\\n' }}{{ m['content'] }}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}{% if messages %}{{ '\\n' }}{% endif %}"
    "<|assistant|>{{ '\\n' }}{% endif %}")


@dataclass
class Record:
    where: str  # "file:line"
    value: dict


def read_jsonl(path: str) -> list[Record]:
    """Parse every line; bad UTF-8, malformed JSON or a non-object line -> ValueError with
    file:line (and the column where it goes wrong)."""
    if Path(path).is_dir():
        raise ValueError(f"data file {path} is a directory (pass a JSONL file)")
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"data file {path} does not exist") from None
    records = []
    for no, data in enumerate(raw.removeprefix(codecs.BOM_UTF8).split(b"\n"), 1):
        try:
            line = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}:{no}: not valid UTF-8 at byte {e.start + 1} of the line "
                             f"(0x{data[e.start]:02x}); save the file as UTF-8") from None
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{no}: malformed JSON: {e.msg} (column {e.colno})") from None
        if not isinstance(value, dict):
            raise ValueError(f"{path}:{no}: expected a JSON object, got {type(value).__name__}")
        records.append(Record(f"{path}:{no}", value))
    if not records:
        raise ValueError(f"{path}: no examples (the file is empty)")
    return records


def _field(rec: Record, key: str, kind, what: str):
    if key not in rec.value:
        raise ValueError(f"{rec.where}: missing field {key!r} ({what})")
    v = rec.value[key]
    if not isinstance(v, kind) or isinstance(v, bool):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise ValueError(f"{rec.where}: field {key!r} must be {names}, got {type(v).__name__}")
    return v


# --------------------------------------------------------------------------- causal-lm
def _causal_format(rec: Record) -> str:
    keys = rec.value.keys()
    for key, task in (("label", "seq-cls"), ("tags", "token-cls")):
        if key in keys:
            raise ValueError(f"{rec.where}: field {key!r}: labelled data is for --task {task}; "
                             f"task causal-lm takes text, alpaca or chat records")
    if "messages" in keys:
        return "chat"
    if "instruction" in keys or "output" in keys:
        return "alpaca"
    if "text" in keys:
        return "text"
    raise ValueError(f"{rec.where}: missing field: causal-lm needs 'text', or 'instruction' + "
                     f"'output' (alpaca), or 'messages' (chat); got keys {sorted(keys)}")


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _encode(tokenizer, text: str) -> list[int]:
    """As pyengine.infer encodes a prompt: with the tokenizer's own special tokens."""
    return tokenizer(text)["input_ids"]


def _eos(tokenizer) -> list[int]:
    return [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []


def _chat_pieces(rec: Record, tokenizer) -> list[tuple[str, bool]]:
    """The conversation as (text, trained?) pieces whose concatenation is the full text."""
    msgs = _field(rec, "messages", list, "a list of {role, content}")
    if not msgs:
        raise ValueError(f"{rec.where}: field 'messages' is empty")
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) \
                or not isinstance(m.get("content"), str):
            raise ValueError(f"{rec.where}: messages[{i}] must be an object with string "
                             f"'role' and 'content'")
    if not any(m["role"] == "assistant" for m in msgs):
        raise ValueError(f"{rec.where}: messages has no 'assistant' turn to train on")
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = FALLBACK_CHAT_TEMPLATE

    def render(upto, gen_prompt):
        return tokenizer.apply_chat_template([dict(role=m["role"], content=m["content"])
                                              for m in msgs[:upto]], tokenize=False,
                                             add_generation_prompt=gen_prompt)
    pieces, done = [], ""
    for i, m in enumerate(msgs):
        if m["role"] == "assistant":
            prompt = render(i, True)
            if not prompt.startswith(done):
                raise ValueError(f"{rec.where}: the tokenizer's chat template is not "
                                 f"prefix-stable; cannot mask the prompt")
            pieces.append((prompt[len(done):], False))
            done = prompt
        full = render(i + 1, False)
        if not full.startswith(done):
            raise ValueError(f"{rec.where}: the tokenizer's chat template is not prefix-stable; "
                             f"cannot mask the prompt")
        pieces.append((full[len(done):], m["role"] == "assistant"))
        done = full
    return pieces


def _causal_example(rec: Record, tokenizer) -> tuple[list[int], list[int]]:
    fmt = _causal_format(rec)
    if fmt == "text":
        ids = _encode(tokenizer, _field(rec, "text", str, "plain text")) + _eos(tokenizer)
        return ids, list(ids)
    if fmt == "alpaca":
        instruction = _field(rec, "instruction", str, "alpaca format")
        output = _field(rec, "output", str, "alpaca format")
        extra = rec.value.get("input", "")
        if not isinstance(extra, str):
            raise ValueError(f"{rec.where}: field 'input' must be str, got {type(extra).__name__}")
        prompt = ALPACA_PROMPT.format(
            ctx=", paired with an input that provides further context" if extra else "",
            instruction=instruction, input=f"### Input:\n{extra}\n\n" if extra else "")
        p = _encode(tokenizer, prompt)
        r = _ids(tokenizer, output) + _eos(tokenizer)
        return p + r, [IGNORE] * len(p) + r
    ids, labels = [], []
    for text, trained in _chat_pieces(rec, tokenizer):
        t = _ids(tokenizer, text)
        ids += t
        labels += t if trained else [IGNORE] * len(t)
    return ids, labels


# --------------------------------------------------------------------------- classification
def _label_name(rec: Record, key: str, value) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ValueError(f"{rec.where}: {key} must be a class name (str) or index (int), got "
                         f"{type(value).__name__}")
    return str(value)


def collect_labels(records: list[Record], task: str) -> list[str]:
    names = set()
    for rec in records:
        if task == "seq-cls":
            _field(rec, "text", str, "seq-cls needs text and label")
            names.add(_label_name(rec, "label", _field(rec, "label", (str, int),
                                                       "seq-cls needs text and label")))
        else:
            for i, t in enumerate(_field(rec, "tags", list, "token-cls needs tokens and tags")):
                names.add(_label_name(rec, f"tags[{i}]", t))
    if len(names) < 2:
        raise ValueError(f"{records[0].where.rsplit(':', 1)[0]}: found {len(names)} class(es) "
                         f"{sorted(names)}; classification needs at least 2")
    return sorted(names, key=lambda s: (not s.isdigit(), int(s) if s.isdigit() else 0, s))


def _class_id(rec: Record, key: str, value, label2id: dict, index_labels: bool) -> int:
    """The class of a label: its name's id, or with given class names an int is the id."""
    if index_labels and isinstance(value, int) and not isinstance(value, bool):
        if not 0 <= value < len(label2id):
            raise ValueError(f"{rec.where}: {key} {value} is not an index into the class names "
                             f"{list(label2id)} (0..{len(label2id) - 1})")
        return value
    name = _label_name(rec, key, value)
    if name not in label2id:
        raise ValueError(f"{rec.where}: {key} {name!r} is not a known class "
                         f"(classes: {sorted(label2id)})")
    return label2id[name]


def _seq_cls_example(rec, tokenizer, label2id, index_labels):
    text = _field(rec, "text", str, "seq-cls needs text and label")
    label = _class_id(rec, "label", _field(rec, "label", (str, int), "seq-cls needs text and label"),
                      label2id, index_labels)
    return tokenizer(text)["input_ids"], label


def _token_cls_example(rec, tokenizer, label2id, index_labels):
    tokens = words(rec, "token-cls needs tokens and tags")
    tags = _field(rec, "tags", list, "token-cls needs tokens and tags")
    if len(tokens) != len(tags):
        raise ValueError(f"{rec.where}: {len(tokens)} tokens but {len(tags)} tags")
    tag_ids = [_class_id(rec, f"tags[{i}]", t, label2id, index_labels) for i, t in enumerate(tags)]
    return label_first_subtokens(tokenizer, tokens, tag_ids)


def words(rec: Record, what: str) -> list[str]:
    """The row's non-empty "tokens" list of str (a token-cls row's words)."""
    tokens = _field(rec, "tokens", list, what)
    if not tokens:
        raise ValueError(f"{rec.where}: field 'tokens' is empty")
    for i, t in enumerate(tokens):
        if not isinstance(t, str):
            raise ValueError(f"{rec.where}: tokens[{i}] must be str, got {type(t).__name__}")
    return tokens


def label_first_subtokens(tokenizer, tokens: list[str], tag_ids: list[int]
                          ) -> tuple[list[int], list[int]]:
    """(input ids, labels): each word's first sub-token labelled with its tag id, the other
    sub-tokens and special tokens IGNORE."""
    enc = tokenizer(tokens, is_split_into_words=True, truncation=False)
    labels, previous = [], None
    for word in enc.word_ids():
        labels.append(IGNORE if word is None or word == previous else tag_ids[word])
        previous = word
    return enc["input_ids"], labels


def truncate(ids: list[int], max_len: int, tokenizer) -> list[int]:
    """A seq-cls text's first max_len ids, keeping the final special token (e.g. [SEP])."""
    if len(ids) <= max_len:
        return ids
    ids = ids[:max_len]
    if tokenizer.sep_token_id is not None:
        ids[-1] = tokenizer.sep_token_id
    return ids


# --------------------------------------------------------------------------- dataset
@dataclass
class Example:
    input_ids: list[int]
    labels: list[int] | int  # per-token labels, or one class id (seq-cls)


class Dataset:
    """Tokenised examples of one JSONL file for one task (already validated).
    labels: the class names (default: collected from the file); index_labels: an int label
    is an index into them (for class names the user gave) rather than a class name."""

    def __init__(self, path: str, task: str, tokenizer, max_seq_len: int,
                 labels: list[str] | None = None, packing: bool = False,
                 index_labels: bool = False):
        self.path, self.task = path, task
        records = read_jsonl(path)
        if task != "causal-lm":
            self.labels = labels if labels is not None else collect_labels(records, task)
            label2id = {name: i for i, name in enumerate(self.labels)}
        else:
            self.labels = None
        examples, truncated = [], 0
        for rec in records:
            if task == "causal-lm":
                ids, lab = _causal_example(rec, tokenizer)
            elif task == "seq-cls":
                ids, lab = _seq_cls_example(rec, tokenizer, label2id, index_labels)
            else:
                ids, lab = _token_cls_example(rec, tokenizer, label2id, index_labels)
            if not ids:
                raise ValueError(f"{rec.where}: tokenises to no tokens")
            if len(ids) > max_seq_len:
                truncated += 1
                if task == "seq-cls":
                    ids = truncate(ids, max_seq_len, tokenizer)
                else:
                    ids, lab = ids[:max_seq_len], lab[:max_seq_len]
            examples.append(Example(ids, lab))
        self.truncated = truncated
        if truncated:
            log.warning("%s: truncated %d of %d sequences to max_seq_len=%d", path, truncated,
                        len(examples), max_seq_len)
        self.examples = pack(examples, max_seq_len) if packing else examples
        if packing:
            log.info("%s: packed %d examples into %d rows of <= %d tokens", path,
                     len(examples), len(self.examples), max_seq_len)

    def __len__(self):
        return len(self.examples)


def pack(examples: list[Example], max_len: int) -> list[Example]:
    """Greedy packing of whole examples, in order, into rows of <= max_len tokens.  The
    first token of each packed example is unlabelled so no loss is taken on predicting
    one example from the previous one (attention still spans the row)."""
    rows, ids, labels = [], [], []
    for ex in examples:
        if ids and len(ids) + len(ex.input_ids) > max_len:
            rows.append(Example(ids, labels))
            ids, labels = [], []
        ids = ids + ex.input_ids
        labels = labels + [IGNORE] + ex.labels[1:]
    rows.append(Example(ids, labels))
    return rows


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch: input_ids, attention_mask, labels ([B] for seq-cls, else [B, T])."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    per_token = not isinstance(examples[0].labels, int)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long) if per_token \
        else torch.tensor([e.labels for e in examples], dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        mask[i, :n] = 1
        if per_token:
            labels[i, :n] = torch.tensor(e.labels)
    return dict(input_ids=ids, attention_mask=mask, labels=labels)


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The example order of one epoch: a permutation fixed by (seed, epoch)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def batches_per_epoch(n: int, batch_size: int) -> int:
    return math.ceil(n / batch_size)
