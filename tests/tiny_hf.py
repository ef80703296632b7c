"""Tiny Hugging Face model directories (random init) with tokenizers trained on a few
sentences, and JSONL writers, for the fine-tuning tests."""
from __future__ import annotations

import json
from pathlib import Path

import torch

DATASET = Path(__file__).resolve().parent.parent / "pyengine" / "datasets" / "sentiment_train.jsonl"


def sentences(n: int | None = None) -> list[dict]:
    rows = [json.loads(line) for line in DATASET.read_text().splitlines()]
    return rows[:n] if n else rows


def write_jsonl(path: Path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _fast(tok, **special):
    from transformers import PreTrainedTokenizerFast
    return PreTrainedTokenizerFast(tokenizer_object=tok, **special)


def llama_tokenizer(add_bos: bool = False):
    """Byte-level BPE (decodes back to the exact text); add_bos: tokenizer(text) starts
    with <s>, as Llama's tokenizers do."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([r["text"] for r in sentences()], trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return _fast(tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>")


def bert_tokenizer():
    """WordPiece with a small vocabulary, so many words split into several sub-tokens."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator([r["text"] for r in sentences()], trainers.WordPieceTrainer(
        vocab_size=200, special_tokens=specials))
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[(s, tok.token_to_id(s)) for s in ("[CLS]", "[SEP]")])
    return _fast(tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                 sep_token="[SEP]", mask_token="[MASK]")


def make_llama(directory: Path, seed: int = 0, hidden_size: int = 32) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM
    tok = llama_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=256, tie_word_embeddings=False, initializer_range=0.2,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    LlamaForCausalLM(cfg).save_pretrained(directory)
    tok.save_pretrained(directory)
    return str(directory)


def make_bert(directory: Path, seed: int = 0) -> str:
    from transformers import BertConfig, BertModel
    tok = bert_tokenizer()
    cfg = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2,
                     num_attention_heads=4, intermediate_size=64, max_position_embeddings=128,
                     initializer_range=0.2,
                     pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    BertModel(cfg).save_pretrained(directory)
    tok.save_pretrained(directory)
    return str(directory)
