"""A lean Llama-family decoder for inference (Llama, Mistral, Qwen2 Hugging Face directories).

What it does: loads config.json + safetensors (optionally merging a PEFT LoRA adapter in
fp32), concatenates q/k/v and gate/up weights into one matrix each, and runs the forward
pass with a preallocated static KV cache [layers, 2, kv_heads, max_len, head_dim].

Math per layer (pre-norm):  h = x + o(attn(rope(q), rope(k), v)) with q,k,v = split(qkv(rms(x)))
                            y = h + down(silu(gate) * up) with gate,up = split(gate_up(rms(h)))
RoPE: the q/k weight rows of every head are permuted at load time from Hugging Face's
"rotate half" order (x_i paired with x_{i+d/2}) to interleaved pairs (x_i, x_{i+d/2}) side by
side -- the same permutation llama.cpp applies -- so the rotation is one complex multiply.
Attention scores are unchanged because q and k are permuted alike. GQA: at decode (one
token) the query heads of a kv group are folded into the query length, so attention runs
without expanding K/V.

Dtypes: fp32 or bf16 weights/activations (F.linear), or quantized weights through a
pluggable callable per linear (`linear_factory(weight, bias, name) -> callable(x)`; name:
the checkpoint weight(s), for messages), which the quantized path supplies. Batch size is
one stream (tokens shape [T]).

Floor per decoded token: read every linear weight once (bytes of the weights; ~35 GB/s
here) plus the KV cache, and ~2 * params FLOPs. At small models Python dispatch dominates,
so a decode step is kept to ~20 torch calls per layer.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from pyengine.nn.quant import QuantLinear

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
Linear = Callable[[torch.Tensor], torch.Tensor]
LinearFactory = Callable[[torch.Tensor, "torch.Tensor | None", str], Linear]  # weight, bias, name


class ModelLoadError(ValueError):
    """The model directory (or adapter) is missing, corrupt or unsupported."""


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


def interleave_rope_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder q/k projection rows (or bias) of each head from rotate-half order to adjacent
    (real, imag) pairs: row j of the half-split becomes row 2j, row j+d/2 becomes 2j+1.
    This is llama.cpp's permutation for HF Llama checkpoints."""
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


# ---------------------------------------------------------------------------------------
# Loading: safetensors (+ optional PEFT adapter merged in fp32)

def _read_safetensors_dir(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError) as e:
            raise ModelLoadError(f"{index}: corrupt index ({e})") from e
    elif (model_dir / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise ModelLoadError(f"{model_dir}: no model.safetensors (or sharded index) found")
    tensors = {}
    for name in files:
        path = model_dir / name
        try:
            tensors.update(load_file(str(path)))
        except (SafetensorError, OSError, RuntimeError) as e:
            raise ModelLoadError(f"{path}: cannot read safetensors ({e})") from e
    return tensors


def merge_adapter(cfg: DecoderConfig, state: dict[str, torch.Tensor], adapter_dir: str | Path):
    """Merge a PEFT LoRA adapter into the fp32 `state` in place (pyengine.lora.read_adapter:
    PEFT's rank / alpha pattern rules; DoRA and other variants refused). modules_to_save
    tensors replace the weight they name; one for lm_head unties a tied head (PEFT trains a
    copy). Returns the config (untied when that happened)."""
    from pyengine.lora import AdapterError, read_adapter

    try:
        adapter = read_adapter(adapter_dir)
    except (AdapterError, FileNotFoundError) as e:
        raise ModelLoadError(str(e)) from e
    where = adapter.weights_file
    head = "lm_head.weight"
    if cfg.tied_embeddings:
        if "lm_head" in adapter.lora:
            raise ModelLoadError(f"{where}: LoRA on lm_head, which shares its weight with "
                                 "model.embed_tokens (tie_word_embeddings): not supported")
        if "model.embed_tokens.weight" in adapter.extra:
            raise ModelLoadError(f"{where}: modules_to_save replaces model.embed_tokens, which "
                                 "is tied to lm_head (tie_word_embeddings): not supported")
        if head in adapter.extra:  # set below
            state[head] = state["model.embed_tokens.weight"]
            cfg = dataclasses.replace(cfg, tied_embeddings=False)
    for name, t in adapter.extra.items():
        if name not in state or state[name].shape != t.shape:
            have = list(state[name].shape) if name in state else "no such weight in the model"
            raise ModelLoadError(f"{where}: {adapter.keys[name]} {list(t.shape)} cannot be placed "
                                 f"in this causal-LM decoder ({name}: {have})")
        state[name] = t.float()
    for path in adapter.lora:
        name = path + ".weight"
        if name not in state:
            raise ModelLoadError(f"{where}: {adapter.keys[path]} targets {name}, which the model "
                                 "does not have")
        delta = adapter.delta(path)
        if state[name].shape != delta.shape:
            raise ModelLoadError(f"{where}: LoRA delta for {name} has shape {list(delta.shape)}, "
                                 f"the weight has {list(state[name].shape)}")
        state[name] = state[name] + delta
    return cfg


def load_hf_state(model_dir: str | Path, adapter: str | Path | None = None):
    """(DecoderConfig, fp32 state dict with the adapter merged) from an HF directory."""
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
    state = {k: v.float() for k, v in _read_safetensors_dir(model_dir).items()}
    if adapter is not None:
        cfg = merge_adapter(cfg, state, adapter)
    return cfg, state


# ---------------------------------------------------------------------------------------
# The model

def dense_linear(dtype: torch.dtype) -> LinearFactory:
    """Factory of plain F.linear layers with weights cast to `dtype`."""
    def make(weight, bias, name=""):
        return functools.partial(F.linear, weight=weight.to(dtype).contiguous(),
                                 bias=None if bias is None else bias.to(dtype))
    return make


@dataclass
class _Layer:
    attn_norm: torch.Tensor
    qkv: Linear
    o: Linear
    mlp_norm: torch.Tensor
    gate_up: Linear
    down: Linear


class LlamaDecoder:
    """Inference-only decoder. `forward(tokens, start)` appends to the KV cache and returns
    the logits of the last position (or all positions with all_logits=True)."""

    def __init__(self, cfg: DecoderConfig, state: dict[str, torch.Tensor], *,
                 dtype: torch.dtype = torch.float32, linear_factory: LinearFactory | None = None,
                 max_len: int = 512, kv_dtype: torch.dtype | None = None):
        for what, t in (("dtype", dtype), ("kv_dtype", kv_dtype or dtype)):
            if t not in (torch.float32, torch.bfloat16):
                raise ValueError(f"{what} must be float32 or bfloat16, got {t}")
        self.cfg, self.dtype = cfg, dtype
        make = linear_factory or dense_linear(dtype)
        nh, nkv = cfg.n_heads, cfg.n_kv_heads

        def get(name):
            if name not in state:
                raise ModelLoadError(f"weight '{name}' missing from the checkpoint")
            return state[name]

        self.layers = []
        for i in range(cfg.n_layers):
            p = f"model.layers.{i}."
            attn, mlp = p + "self_attn.", p + "mlp."
            q, k, v = (get(attn + f"{n}_proj.weight") for n in "qkv")
            qkv_w = torch.cat([interleave_rope_rows(q, nh), interleave_rope_rows(k, nkv), v])
            qkv_b = None
            if p + "self_attn.q_proj.bias" in state:
                qb, kb, vb = (get(p + f"self_attn.{n}_proj.bias") for n in "qkv")
                qkv_b = torch.cat([interleave_rope_rows(qb, nh), interleave_rope_rows(kb, nkv), vb])
            gate_up_w = torch.cat([get(p + "mlp.gate_proj.weight"), get(p + "mlp.up_proj.weight")])
            self.layers.append(_Layer(
                attn_norm=get(p + "input_layernorm.weight").to(dtype),
                qkv=make(qkv_w, qkv_b, attn + "{q,k,v}_proj.weight"),
                o=make(get(attn + "o_proj.weight"), state.get(attn + "o_proj.bias"), attn + "o_proj.weight"),
                mlp_norm=get(p + "post_attention_layernorm.weight").to(dtype),
                gate_up=make(gate_up_w, None, mlp + "{gate,up}_proj.weight"),
                down=make(get(mlp + "down_proj.weight"), None, mlp + "down_proj.weight")))
        embed = get("model.embed_tokens.weight")
        self.embed = embed.to(dtype)
        self.final_norm = get("model.norm.weight").to(dtype)
        untied = not cfg.tied_embeddings and "lm_head.weight" in state
        self.lm_head = (make(state["lm_head.weight"], None, "lm_head.weight") if untied
                        else make(embed, None, "model.embed_tokens.weight"))
        self.inv_freq = rope_inv_freq(cfg)
        # KV cache: bf16 for quantized models (half the bytes; k, v rounded once), else dtype
        quantized = all(isinstance(l, QuantLinear) for layer in self.layers
                        for l in (layer.qkv, layer.o, layer.gate_up, layer.down))
        self.kv_dtype = kv_dtype or (torch.bfloat16 if quantized else dtype)
        self.c_step = True  # one-token forwards may use the C++ decode step (False: torch path)
        self.max_len = 0
        self.reserve(max_len)

    @classmethod
    def from_pretrained(cls, model_dir, *, adapter=None, dtype=torch.float32,
                        linear_factory=None, max_len=512, kv_dtype=None) -> "LlamaDecoder":
        cfg, state = load_hf_state(model_dir, adapter)
        return cls(cfg, state, dtype=dtype, linear_factory=linear_factory, max_len=max_len,
                   kv_dtype=kv_dtype)

    def reserve(self, max_len: int) -> None:
        """Make room for `max_len` positions (KV cache and RoPE table); keeps nothing."""
        if max_len <= self.max_len:
            return
        c = self.cfg
        self.max_len = max_len
        self.kv_cache = torch.empty(c.n_layers, 2, c.n_kv_heads, max_len, c.head_dim,
                                    dtype=self.kv_dtype)
        self._step = None  # the C++ decode step points at the cache: rebuilt on first use
        angles = torch.outer(torch.arange(max_len, dtype=torch.float64), self.inv_freq)
        self.rope = torch.polar(torch.ones_like(angles), angles).to(torch.complex64)  # [pos, d/2]

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, start: int, all_logits: bool = False) -> torch.Tensor:
        """tokens [T] int64 at positions start..start+T-1 -> logits [V] (or [T, V]) in fp32."""
        T = tokens.shape[0]
        end = start + T
        if end > self.max_len:
            raise ValueError(f"position {end} exceeds the KV cache ({self.max_len}); call reserve()")
        if T == 1 and self.c_step:  # every linear quantized for the C++ kernel: one C++ call
            if self._step is None:
                from pyengine.infer.decode_step import from_decoder
                self._step = from_decoder(self) or False
            if self._step:
                logits = self._step(int(tokens[0]), start)
                return logits[None] if all_logits else logits
        c = self.cfg
        nh, nkv, hd, eps = c.n_heads, c.n_kv_heads, c.head_dim, c.rms_eps
        groups, qk_width, q_width = nh // nkv, (nh + nkv) * hd, nh * hd
        hidden = (c.hidden,)
        rope = self.rope[start:end, None, :]  # [T, 1, d/2]
        rope_in_fp32 = self.dtype != torch.float32
        if T == 1:
            mask, causal = None, False
        elif start == 0:
            mask, causal = None, True
        else:
            mask = torch.ones(T, end, dtype=torch.bool).tril_(start)
            causal = False
        x = F.embedding(tokens, self.embed)
        for layer, kv in zip(self.layers, self.kv_cache):
            qkv = layer.qkv(F.rms_norm(x, hidden, layer.attn_norm, eps))
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
            x = x + layer.o(attn.reshape(T, q_width))
            gate_up = layer.gate_up(F.rms_norm(x, hidden, layer.mlp_norm, eps))
            gate, up = gate_up.chunk(2, dim=-1)
            x = x + layer.down(F.silu(gate) * up)
        if not all_logits:
            x = x[-1:]
        logits = self.lm_head(F.rms_norm(x, hidden, self.final_norm, eps)).float()
        return logits if all_logits else logits[0]
