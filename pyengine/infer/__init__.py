"""Text generation with pyengine's inference decoder: greedy or temperature/top-p sampling
(seeded), tokens streamed as they come, prefill and decode speed measured.

    model = load_model("path/to/hf_dir", quant="q8_0")
    text = generate(model, tokenizer, "Hello", max_new_tokens=32, stream=print)
"""
from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch

from pyengine.models import load_tokenizer
from pyengine.infer.model import LlamaDecoder, ModelLoadError

log = logging.getLogger("pyengine")
QUANT_FORMATS = ("none", "q8_0", "q4_0", "nf4")

__all__ = ["GenerationStats", "LlamaDecoder", "ModelLoadError", "QUANT_FORMATS", "encode_chat",
           "generate", "generate_ids", "load_model", "load_tokenizer", "sample_next", "TextStreamer"]


def load_model(model_dir, *, adapter=None, quant: str = "none", dtype=torch.float32,
               max_len: int = 512) -> LlamaDecoder:
    """Load an HF Llama/Mistral/Qwen2 directory (tensor by tensor); merge `adapter` (PEFT
    dir) in fp32, then quantize the linear weights to `quant` (activations stay fp32) or cast
    them to `dtype`."""
    if quant not in QUANT_FORMATS:
        raise ValueError(f"quant must be one of {', '.join(QUANT_FORMATS)}, got '{quant}'")
    if quant != "none":
        dtype = torch.float32
    return LlamaDecoder.from_pretrained(model_dir, adapter=adapter, dtype=dtype, quant=quant,
                                        max_len=max_len)


@dataclass
class GenerationStats:
    prompt_tokens: int
    new_tokens: int
    prefill_seconds: float
    decode_seconds: float  # for new_tokens - 1 decode steps (the first comes from prefill)

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        steps = self.new_tokens - 1
        return steps / self.decode_seconds if steps > 0 and self.decode_seconds else 0.0

    def __str__(self) -> str:
        return (f"prefill: {self.prompt_tokens} tokens, {self.prefill_tokens_per_s:.1f} tokens/s | "
                f"decode: {self.new_tokens} tokens, {self.decode_tokens_per_s:.1f} tokens/s")


def sample_next(logits: torch.Tensor, temperature: float, top_p: float,
                generator: torch.Generator | None) -> int:
    """Next token id from logits [V]: argmax when temperature == 0, else nucleus sampling."""
    if temperature == 0.0:
        return int(logits.argmax())
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        # keep the smallest prefix whose mass reaches top_p (always at least one token)
        drop = sorted_probs.cumsum(0) - sorted_probs >= top_p
        sorted_probs[drop] = 0.0
        pick = torch.multinomial(sorted_probs, 1, generator=generator)
        return int(order[pick])
    return int(torch.multinomial(probs, 1, generator=generator))


def _check_sampling(max_new_tokens, temperature, top_p):
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


@torch.inference_mode()
def generate_ids(model: LlamaDecoder, prompt_ids: list[int], *, max_new_tokens: int = 64,
                 temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
                 stop_ids: tuple[int, ...] = (),
                 on_token: Callable[[int], None] | None = None) -> tuple[list[int], GenerationStats]:
    """Generate up to `max_new_tokens` ids after `prompt_ids` (stops after any of `stop_ids`)."""
    _check_sampling(max_new_tokens, temperature, top_p)
    if not prompt_ids:
        raise ValueError("the prompt is empty (no tokens)")
    context = model.cfg.max_positions
    if len(prompt_ids) + max_new_tokens > context:
        raise ValueError(
            f"the prompt ({len(prompt_ids)} tokens) + max_new_tokens ({max_new_tokens}) = "
            f"{len(prompt_ids) + max_new_tokens} exceeds the model's context of {context} tokens "
            f"(max_position_embeddings)" + (f"; use max_new_tokens <= {context - len(prompt_ids)}"
                                            if len(prompt_ids) < context else
                                            "; shorten the prompt"))
    model.reserve(len(prompt_ids) + max_new_tokens)
    generator = None
    if temperature > 0:
        generator = torch.Generator()
        generator.manual_seed(seed if seed is not None else torch.seed())
    forward = model.forward
    t0 = time.perf_counter()
    logits = forward(torch.tensor(prompt_ids, dtype=torch.long), 0)
    token = sample_next(logits, temperature, top_p, generator)
    t1 = time.perf_counter()
    out = [token]
    if on_token:
        on_token(token)
    pos = len(prompt_ids)
    step_input = torch.empty(1, dtype=torch.long)
    while len(out) < max_new_tokens and token not in stop_ids:
        step_input.fill_(token)
        token = sample_next(forward(step_input, pos), temperature, top_p, generator)
        pos += 1
        out.append(token)
        if on_token:
            on_token(token)
    t2 = time.perf_counter()
    return out, GenerationStats(len(prompt_ids), len(out), t1 - t0, t2 - t1)


class TextStreamer:
    """Turns generated ids into text pieces for `sink`. Holds back an incomplete UTF-8
    sequence and, with `stop` strings, a tail that may begin one; once the text reaches a
    stop string it is cut before it and `stopped` is set (the server's `stop`).

    Each token decodes a window of a few ids, not the whole output: the new text is
    decode(ids[prefix:]) past decode(ids[prefix:read]), where ids[prefix:read] are the last
    ids already turned into text (both decodes start at the same id, so a tokenizer's
    leading-space rule treats them alike)."""

    def __init__(self, tokenizer, sink: Callable[[str], None], stop: tuple[str, ...] = ()):
        self.tokenizer, self.sink, self.stop = tokenizer, sink, tuple(s for s in stop if s)
        self.ids, self.prefix, self.read = [], 0, 0
        self.text, self.sent, self.stopped = "", 0, False

    def __call__(self, token: int) -> None:
        self.ids.append(token)
        self.flush(final=False)

    def flush(self, final: bool = True) -> None:
        if self.stopped:
            return
        decode = self.tokenizer.decode
        new = decode(self.ids[self.prefix:], skip_special_tokens=True)
        old = decode(self.ids[self.prefix:self.read], skip_special_tokens=True)
        if len(new) > len(old) and (final or not new.endswith("\ufffd")):
            self.text += new[len(old):]
            self.prefix, self.read = self.read, len(self.ids)
        end = len(self.text)
        if self.stop:
            longest = max(map(len, self.stop))
            start = max(0, self.sent - longest + 1)  # a stop string may straddle `sent`
            hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                end, self.stopped = min(hits), True
                self.text = self.text[:end]
            elif not final:  # hold back the longest tail that begins a stop string
                end -= max((n for n in range(1, min(longest, end) + 1)
                            if any(s.startswith(self.text[-n:]) for s in self.stop)), default=0)
        if end > self.sent:
            self.sink(self.text[self.sent:end])
            self.sent = end


def _print_piece(piece: str) -> None:
    sys.stdout.write(piece)
    sys.stdout.flush()


def encode_chat(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of `messages` ({"role", "content"} dicts) through the tokenizer's chat
    template, with the generation prompt (the template writes the special tokens)."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_prompt(tokenizer, prompt: str, chat: bool = False) -> list[int]:
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("--chat: this tokenizer has no chat template")
        return encode_chat(tokenizer, [{"role": "user", "content": prompt}])
    return tokenizer(prompt)["input_ids"]


def generate(model: LlamaDecoder, tokenizer, prompt: str, max_new_tokens: int = 64,
             temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
             stream: Callable[[str], None] | bool | None = None, chat: bool = False,
             report: Callable[[GenerationStats], None] | None = None) -> str:
    """Generate a continuation of `prompt` and return it as text.

    Greedy when temperature == 0, else sampling with temperature and top-p from a generator
    seeded with `seed`. `stream`: a callable receiving text pieces as tokens arrive, or True
    to print them. `report` receives the GenerationStats (prefill / decode tokens/s)."""
    stop = set(model.cfg.eos_token_ids)
    if tokenizer.eos_token_id is not None:
        stop.add(tokenizer.eos_token_id)
    on_token = None
    if stream:
        on_token = TextStreamer(tokenizer, _print_piece if stream is True else stream)
    ids, stats = generate_ids(model, encode_prompt(tokenizer, prompt, chat),
                              max_new_tokens=max_new_tokens, temperature=temperature,
                              top_p=top_p, seed=seed, stop_ids=tuple(stop), on_token=on_token)
    if on_token:
        on_token.flush()
    if report:
        report(stats)
    return tokenizer.decode(ids, skip_special_tokens=True)
