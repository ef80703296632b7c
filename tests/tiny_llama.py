"""Tiny random Llama-family HF directories with a byte-level BPE tokenizer, for the
inference and export tests."""
from pathlib import Path

import torch
import transformers

TEXTS = ["the quick brown fox jumps over the lazy dog", "hello world, this is a tiny model",
         "pyengine runs llama models on the cpu", "café and naïve words too"] * 3
CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")


def save_tiny_tokenizer(path: Path):
    """Byte-level BPE trained on a few sentences (the GPT-2 / Llama-3 family of tokenizers)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(TEXTS, trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(path)
    return fast


def save_tiny_model(path: Path, config_cls="LlamaConfig", seed=0, **overrides):
    tok = save_tiny_tokenizer(path)
    kwargs = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  tie_word_embeddings=True, initializer_range=0.2, bos_token_id=0,
                  eos_token_id=1, rope_theta=500.0)
    kwargs.update(overrides)
    cfg = getattr(transformers, config_cls)(**kwargs)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    model.save_pretrained(path)
    return model, tok
