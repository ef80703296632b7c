"""A lean Llama-family decoder for inference (Llama, Mistral, Qwen2 Hugging Face directories).

The model is an nn.Module tree built from a DecoderConfig (gpt-fast style): embed
(nn.Embedding), layers (Block: RMSNorm weights attn_norm, mlp_norm; linears qkv, o, gate_up,
down), the final RMSNorm weight norm, lm_head (nn.Linear, the embedding's Parameter when tied),
so it has a state_dict, `.to(dtype)` and module swapping: quantization replaces each
nn.Linear by a pyengine.nn.quant.QuantLinear (`quantize`).  The KV cache
[layers, 2, kv_heads, max_len, head_dim] (kv_dtype: bf16 for quantized models, else the
model dtype) and the RoPE table (complex64) are non-persistent buffers that `.to()` moves but
never casts.

Loading (from_pretrained): config.json + safetensors read lazily, one tensor at a time in
its stored dtype (pyengine.infer.weights: the HF <-> ours <-> GGUF name table, and an
optional PEFT LoRA adapter merged per tensor in fp32); q/k/v and gate/up are concatenated
into one matrix each; with `quant`, each linear is quantized as soon as it is read (fp32
for that tensor only), so loading never holds more than the model plus a layer's tensors.

Math per layer (pre-norm):  h = x + o(attn(rope(q), rope(k), v)) with q,k,v = split(qkv(rms(x)))
                            y = h + down(silu(gate) * up) with gate,up = split(gate_up(rms(h)))
RoPE: the q/k weight rows of every head are permuted at load time from Hugging Face's
"rotate half" order (x_i paired with x_{i+d/2}) to interleaved pairs (x_i, x_{i+d/2}) side by
side -- the same permutation llama.cpp applies -- so the rotation is one complex multiply.
Attention scores are unchanged because q and k are permuted alike. GQA: at decode (one
token) the query heads of a kv group are folded into the query length, so attention runs
without expanding K/V.

Dtypes: fp32 or bf16 weights/activations (F.linear), or q8_0 / q4_0 / nf4 weights with fp32
activations (QuantLinear's inference forward: the quant_matmul kernel called directly).
Batch size is one stream (tokens shape [T]).

Floor per decoded token: read every linear weight once (bytes of the weights; ~35 GB/s
here) plus the KV cache, and ~2 * params FLOPs. A one-token forward of a quantized model is
one C++ call (pyengine.infer.decode_step, csrc/decode.h); forward_torch (the spec, prefill,
fp32/bf16 models) keeps a decode step to ~20 torch calls per layer, since at small models
Python dispatch dominates.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from pyengine.infer.weights import (Checkpoint, ModelLoadError, WeightTable, gather,
                                    interleave_rope_rows)

log = logging.getLogger("pyengine")
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
__all__ = ["Block", "DecoderConfig", "LlamaDecoder", "ModelLoadError", "interleave_rope_rows",
           "open_checkpoint", "quantize_linear", "rope_inv_freq"]


@dataclass(frozen=True)
class DecoderConfig:
    n_layers: int
    hidden: int
    intermediate: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab: int
    rms_eps: float
    rope_theta: float
    rope_scaling: dict | None
    tied_embeddings: bool
    max_positions: int
    eos_token_ids: tuple[int, ...]
    model_type: str

    @classmethod
    def from_hf(cls, hf) -> "DecoderConfig":
        if hf.model_type not in SUPPORTED_MODEL_TYPES:
            raise ModelLoadError(f"unsupported architecture model_type='{hf.model_type}' "
                                 f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
        if getattr(hf, "hidden_act", "silu") != "silu":
            raise ModelLoadError(f"unsupported hidden_act='{hf.hidden_act}' (only silu)")
        if getattr(hf, "mlp_bias", False):
            raise ModelLoadError("unsupported: mlp_bias=True")
        if getattr(hf, "use_sliding_window", False):
            raise ModelLoadError("unsupported: use_sliding_window=True")
        rope = dict(getattr(hf, "rope_parameters", None) or {})
        theta = rope.get("rope_theta", getattr(hf, "rope_theta", 10000.0))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        legacy = getattr(hf, "rope_scaling", None)  # transformers < 5 keeps it apart
        if rope_type == "default" and legacy:
            rope, rope_type = dict(legacy), legacy.get("rope_type", legacy.get("type"))
        if rope_type not in ("default", "llama3", "linear"):
            raise ModelLoadError(f"unsupported rope scaling type '{rope_type}' "
                                 "(supported: default, linear, llama3)")
        eos = hf.eos_token_id
        eos = () if eos is None else (tuple(eos) if isinstance(eos, (list, tuple)) else (eos,))
        n_heads = hf.num_attention_heads
        head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // n_heads
        return cls(
            n_layers=hf.num_hidden_layers, hidden=hf.hidden_size,
            intermediate=hf.intermediate_size, n_heads=n_heads,
            n_kv_heads=getattr(hf, "num_key_value_heads", None) or n_heads, head_dim=head_dim,
            vocab=hf.vocab_size, rms_eps=hf.rms_norm_eps, rope_theta=float(theta),
            rope_scaling=None if rope_type == "default" else rope,
            tied_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
            max_positions=getattr(hf, "max_position_embeddings", 2048),
            eos_token_ids=eos, model_type=hf.model_type)

    def linear_parts(self) -> dict[str, tuple[tuple[int, ...], int]]:
        """Per linear of a block (qkv, o, gate_up, down): the output rows of each of its
        Hugging Face parts in order (q, k, v; gate, up) and its input width."""
        q, kv = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        return {"qkv": ((q, kv, kv), self.hidden), "o": ((self.hidden,), q),
                "gate_up": ((self.intermediate,) * 2, self.hidden),
                "down": ((self.hidden,), self.intermediate)}

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(N, K) of each linear of a block."""
        return {name: (sum(rows), k) for name, (rows, k) in self.linear_parts().items()}


def rope_inv_freq(cfg: DecoderConfig) -> torch.Tensor:
    """Inverse frequencies [head_dim/2] in fp64, with llama3 / linear scaling applied."""
    d = cfg.head_dim
    inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    scaling = cfg.rope_scaling
    if scaling is None:
        return inv_freq
    factor = float(scaling["factor"])
    if scaling.get("rope_type", scaling.get("type")) == "linear":
        return inv_freq / factor
    # llama3: long wavelengths slowed by `factor`, short kept, smooth blend in between.
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old_len = float(scaling["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    out = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    mid = (wavelen <= old_len / low) & (wavelen >= old_len / high)
    return torch.where(mid, blended, out)


def open_checkpoint(model_dir: str | Path, adapter: str | Path | None = None):
    """(DecoderConfig, Checkpoint) of an HF directory: the config checked, the tensors not
    read yet (a PEFT `adapter` checked now and merged as tensors are read)."""
    from transformers import AutoConfig

    model_dir = Path(model_dir)
    if model_dir.is_file():
        raise ModelLoadError(f"{model_dir} is a file: pass the model directory "
                             f"{model_dir.parent} (the one holding config.json)")
    if not model_dir.is_dir():
        raise ModelLoadError(f"model directory {model_dir} does not exist")
    if not (model_dir / "config.json").is_file():
        raise ModelLoadError(f"{model_dir}: config.json not found")
    try:
        hf_cfg = AutoConfig.from_pretrained(str(model_dir), local_files_only=True)
    except (ValueError, OSError, KeyError) as e:
        raise ModelLoadError(f"{model_dir}/config.json: cannot parse ({e})") from e
    cfg = DecoderConfig.from_hf(hf_cfg)
    ckpt = Checkpoint(model_dir, cfg.n_layers, cfg.tied_embeddings, adapter)
    if ckpt.untied_head:
        cfg = dataclasses.replace(cfg, tied_embeddings=False)
    return cfg, ckpt


# ---------------------------------------------------------------------------------------
# The model

def _frozen(t: torch.Tensor) -> nn.Parameter:
    """`t` as a frozen Parameter (a Parameter stays itself, so a tied head stays tied)."""
    return t if isinstance(t, nn.Parameter) else nn.Parameter(t, requires_grad=False)


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """An nn.Linear holding these very tensors (no init, no copy)."""
    m = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    m.weight = _frozen(weight)
    if bias is not None:
        m.bias = _frozen(bias)
    return m


def quantize_linear(linear: nn.Linear, fmt: str, name: str) -> nn.Module:
    """A QuantLinear (inference forward) holding `linear`'s weight in `fmt`, or `linear`
    itself when its in_features is not a multiple of the format's block (a warning naming
    it, as finetune's quantize_base and the GGUF export do)."""
    from pyengine.nn.quant import InferenceQuantLinear
    from pyengine.quant import format_spec, quantize

    block = format_spec(fmt).block
    if linear.in_features % block:
        log.warning("%s kept in fp32: in_features %d is not a multiple of the %s block (%d)",
                    name, linear.in_features, fmt, block)
        return linear
    return InferenceQuantLinear(quantize(linear.weight.float().contiguous(), fmt), linear.bias)


class Block(nn.Module):
    """One pre-norm decoder layer: RMSNorm weights attn_norm / mlp_norm [H] and the linears
    qkv, o, gate_up, down (LlamaDecoder.forward_torch runs them)."""

    def __init__(self, attn_norm: torch.Tensor, qkv: nn.Module, o: nn.Module,
                 mlp_norm: torch.Tensor, gate_up: nn.Module, down: nn.Module):
        super().__init__()
        self.attn_norm, self.mlp_norm = _frozen(attn_norm), _frozen(mlp_norm)
        self.qkv, self.o, self.gate_up, self.down = qkv, o, gate_up, down

    def __setattr__(self, name, value):
        super().__setattr__(name, value)
        self.__dict__.pop("steps", None)  # a swapped-in module or weight is the one that runs

    def _apply(self, fn, recurse=True):
        self.__dict__.pop("steps", None)  # .to() may put new tensors in
        return super()._apply(fn, recurse)

    @functools.cached_property
    def steps(self) -> tuple:
        """(attn_norm, qkv, o, mlp_norm, gate_up, down): the norm weights and the linears'
        forward methods, looked up once for the per-token loop (Module.__call__ and
        __getattr__ cost ~1 us each: ~5-10% of a small model's decode step)."""
        return (self.attn_norm, self.qkv.forward, self.o.forward, self.mlp_norm,
                self.gate_up.forward, self.down.forward)


class LlamaDecoder(nn.Module):
    """Inference-only decoder. `forward(tokens, start)` appends to the KV cache and returns
    the logits of the last position (or all positions with all_logits=True).

    `state` maps HF checkpoint names to tensors (a dict, or a lazy Checkpoint); each of our
    tensors is built from its HF ones (pyengine.infer.weights) and cast to `dtype`, or, with
    `quant` (q8_0 | q4_0 | nf4; fp32 activations), quantized right away."""

    def __init__(self, cfg: DecoderConfig, state: Mapping[str, torch.Tensor], *,
                 dtype: torch.dtype = torch.float32, quant: str = "none", max_len: int = 512,
                 kv_dtype: torch.dtype | None = None):
        super().__init__()
        for what, t in (("dtype", dtype), ("kv_dtype", kv_dtype or dtype)):
            if t not in (torch.float32, torch.bfloat16):
                raise ValueError(f"{what} must be float32 or bfloat16, got {t}")
        if quant != "none" and dtype != torch.float32:
            raise ValueError(f"quant={quant!r} runs fp32 activations: dtype must be float32, "
                             f"got {dtype}")
        self.cfg = cfg
        table = WeightTable(cfg.n_layers)

        def load(ours: str) -> torch.Tensor | None:
            return gather(state, table.by_ours[ours], dtype, cfg.n_heads, cfg.n_kv_heads)

        def linear(ours: str) -> nn.Module:
            bias = load(ours + ".bias") if ours + ".bias" in table.by_ours else None
            m = _linear(load(ours + ".weight"), bias)
            if quant == "none":
                return m
            hf_names = ", ".join(w.hf for w in table.by_ours[ours + ".weight"])
            return quantize_linear(m, quant, hf_names)

        self.embed = nn.Embedding.from_pretrained(load("embed.weight"), freeze=True)
        self.layers = nn.ModuleList(
            Block(load(f"layers.{i}.attn_norm"), linear(f"layers.{i}.qkv"), linear(f"layers.{i}.o"),
                  load(f"layers.{i}.mlp_norm"), linear(f"layers.{i}.gate_up"),
                  linear(f"layers.{i}.down"))
            for i in range(cfg.n_layers))
        self.norm = _frozen(load("norm"))
        if not cfg.tied_embeddings and "lm_head.weight" in state:
            self.lm_head = linear("lm_head")
        else:  # tied: the embedding's Parameter (quantized: from it)
            self.lm_head = _linear(self.embed.weight, None)
            if quant != "none":
                self.lm_head = quantize_linear(self.lm_head, quant, "model.embed_tokens.weight")
        # KV cache: bf16 for quantized models (half the bytes; k, v rounded once), else dtype
        self.kv_dtype = kv_dtype or (dtype if quant == "none" else torch.bfloat16)
        self.register_buffer("rope", torch.empty(0, dtype=torch.complex64), persistent=False)
        self.register_buffer("kv_cache", torch.empty(0, dtype=self.kv_dtype), persistent=False)
        self.c_step = True  # one-token forwards may use the C++ decode step (False: torch path)
        self._step = None  # built on first use; dropped when tensors move (reserve, .to, quantize)
        self.max_len = 0
        self.reserve(max_len)

    @classmethod
    def from_pretrained(cls, model_dir, *, adapter=None, dtype=torch.float32, quant: str = "none",
                        max_len=512, kv_dtype=None) -> "LlamaDecoder":
        cfg, ckpt = open_checkpoint(model_dir, adapter)
        return cls(cfg, ckpt, dtype=dtype, quant=quant, max_len=max_len, kv_dtype=kv_dtype)

    def quantize(self, fmt: str) -> "LlamaDecoder":
        """Replace every nn.Linear (the LM head included) by a QuantLinear in `fmt`, in place
        (ragged ones stay, warned: quantize_linear). Needs fp32 weights; the KV cache keeps
        its kv_dtype."""
        if self.embed.weight.dtype != torch.float32:
            raise ValueError(f"quantize: the model is {self.embed.weight.dtype}; quantized "
                             "layers run fp32 activations (quantize an fp32 model)")
        for name, m in list(self.named_modules()):
            if type(m) is nn.Linear:
                parent, _, child = name.rpartition(".")
                quantized = quantize_linear(m, fmt, name + ".weight")
                setattr(self.get_submodule(parent), child, quantized)
        self._step = None
        return self

    def reserve(self, max_len: int) -> None:
        """Make room for `max_len` positions (KV cache and RoPE table); keeps nothing."""
        if max_len <= self.max_len:
            return
        c = self.cfg
        self.max_len = max_len
        self.kv_cache = torch.empty(c.n_layers, 2, c.n_kv_heads, max_len, c.head_dim,
                                    dtype=self.kv_dtype, device=self.embed.weight.device)
        self._step = None  # the C++ decode step points at the cache
        angles = torch.outer(torch.arange(max_len, dtype=torch.float64), rope_inv_freq(c))
        self.rope = torch.polar(torch.ones_like(angles), angles).to(self.kv_cache.device,
                                                                    torch.complex64)  # [pos, d/2]

    def _apply(self, fn, recurse=True):
        """`.to(dtype)` and the like cast the weights; the RoPE table (complex64) and the KV
        cache (kv_dtype) keep their dtypes (only moved)."""
        kept = {name: self._buffers.pop(name) for name in ("rope", "kv_cache")}
        super()._apply(fn, recurse)
        for name, t in kept.items():
            self.register_buffer(name, t.to(self.embed.weight.device), persistent=False)
        self._step = None
        return self

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, start: int, all_logits: bool = False) -> torch.Tensor:
        """tokens [T] int64 at positions start..start+T-1 -> logits [V] (or [T, V]) in fp32."""
        end = start + tokens.shape[0]
        if end > self.max_len:
            raise ValueError(f"position {end} exceeds the KV cache ({self.max_len}); call reserve()")
        if tokens.shape[0] == 1 and self.c_step:  # every linear quantized for the C++ kernel
            if self._step is None:
                from pyengine.infer.decode_step import from_decoder
                self._step = from_decoder(self) or False
            if self._step:
                logits = self._step(int(tokens[0]), start)
                return logits[None] if all_logits else logits
        return self.forward_torch(tokens, start, all_logits)

    def forward_torch(self, tokens: torch.Tensor, start: int, all_logits: bool) -> torch.Tensor:
        """forward's torch body (any T; the KV cache must hold start + T positions). The
        layers' linears run through Block.steps (their forward: no module hooks)."""
        T = tokens.shape[0]
        end = start + T
        c = self.cfg
        nh, nkv, hd, eps, hidden = c.n_heads, c.n_kv_heads, c.head_dim, c.rms_eps, (c.hidden,)
        groups, qk_width, q_width = nh // nkv, (nh + nkv) * hd, nh * hd
        rope = self.rope[start:end, None, :]  # [T, 1, d/2]
        if T == 1:
            mask, causal = None, False
        elif start == 0:
            mask, causal = None, True
        else:
            mask = torch.ones(T, end, dtype=torch.bool).tril_(start)
            causal = False
        x = self.embed(tokens)
        rope_in_fp32 = x.dtype != torch.float32
        for layer, kv in zip(self.layers, self.kv_cache):
            attn_norm, qkv_proj, o_proj, mlp_norm, gate_up_proj, down_proj = layer.steps
            qkv = qkv_proj(F.rms_norm(x, hidden, attn_norm, eps))
            # rotate q and k in place inside qkv, then write k and v to the cache in one copy
            qk = qkv[:, :qk_width].view(T, nh + nkv, hd // 2, 2)
            if rope_in_fp32:
                qk.copy_(torch.view_as_real(torch.view_as_complex(qk.float()) * rope))
            else:
                torch.view_as_complex(qk).mul_(rope)
            kv[:, :, start:end].copy_(qkv[:, q_width:].view(T, 2, nkv, hd).permute(1, 2, 0, 3))
            keys, values = kv[:, None, :, :end].to(qkv.dtype)  # [1, kv_heads, end, head_dim] each
            if T == 1:  # the query heads of a kv group become that group's query rows
                q = qkv[:, :q_width].view(1, nkv, groups, hd)
                attn = F.scaled_dot_product_attention(q, keys, values)
            else:
                q = qkv[:, :q_width].view(T, nh, hd).transpose(0, 1)[None]
                attn = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, is_causal=causal,
                                                      enable_gqa=groups > 1)[0].transpose(0, 1)
            x = x + o_proj(attn.reshape(T, q_width))
            gate, up = gate_up_proj(F.rms_norm(x, hidden, mlp_norm, eps)).chunk(2, dim=-1)
            x = x + down_proj(F.silu(gate) * up)
        if not all_logits:
            x = x[-1:]
        logits = self.lm_head(F.rms_norm(x, hidden, self.norm, eps)).float()
        return logits if all_logits else logits[0]
