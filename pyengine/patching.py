"""patch_model: run pyengine's fused kernels inside one Hugging Face model instance.

Explicit replacement on the given instance only (transformers' classes and functions are
never edited; other instances are unaffected):
- rms_norm: every Llama / Mistral / Qwen2 RMSNorm becomes pyengine.nn.RMSNorm (same
  `weight` Parameter), and each decoder layer's forward does "residual + attention output
  -> post_attention_layernorm" as one fused add + norm.
- rope: each Llama / Mistral / Qwen2 attention's forward applies pyengine.ops.rope, then
  calls the attention function config._attn_implementation selects, with the arguments
  HF's forward passes (so any registered attention kernel plugs in unchanged).
- layer_norm: every nn.LayerNorm over one dimension becomes pyengine.nn.LayerNorm, and
  BERT / RoBERTa `SelfOutput` / `Output` blocks add their residual inside it.
- swiglu: Llama / Mistral / Qwen2 MLPs with SiLU run silu(gate) * up as pyengine.ops.swiglu
  (their projections may be LoRALinear; MLPs apply_lora fused into LoRAMLP already are).
Modules of other classes (e.g. Qwen3's q/k norms, Gemma's (1 + weight) RMSNorm) are left
alone; a model with Gemma RMSNorms or with nothing to patch is refused.  Idempotent.
"""
from __future__ import annotations

import importlib
import sys
import types

from torch import nn

from pyengine.nn.norms import LayerNorm, RMSNorm
from pyengine.ops.rope import rope as fused_rope
from pyengine.ops.swiglu import swiglu as fused_swiglu

DECODERS = ("llama", "mistral", "qwen2")  # transformers.models.<name>.modeling_<name>
ENCODERS = ("bert", "roberta")
# the extra keyword HF's attention forward passes to the attention function, per family
_SLIDING_WINDOW = {
    "llama": None,
    "mistral": lambda attn: getattr(attn.config, "sliding_window", None),
    "qwen2": lambda attn: attn.sliding_window,
}


def _classes(family: str, suffixes: tuple[str, ...]) -> dict[type, str]:
    """{class: suffix} of transformers' modeling_<family> classes <Family><suffix>."""
    mod = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    out = {}
    for name in dir(mod):
        for suffix in suffixes:
            if name.endswith(suffix) and name[: -len(suffix)].lower() == family:
                out[getattr(mod, name)] = suffix
    return out


def _attention_forward(self, hidden_states, position_embeddings=None, attention_mask=None,
                       cache=None, **kwargs):
    """HF's Llama / Mistral / Qwen2 attention forward with the fused RoPE."""
    if "past_key_values" in kwargs:  # the deprecated name HF still accepts
        cache = kwargs.pop("past_key_values")
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, self.head_dim)
    query = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
    key = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
    value = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
    cos, sin = position_embeddings
    query, key = fused_rope(query, key, cos, sin)
    if cache is not None:
        key, value = cache.update(key, value, self.layer_idx, kwargs=kwargs)
    hf = sys.modules[type(self).__module__]  # the modeling file HF's own forward reads
    attention = hf.ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation,
                                                         hf.eager_attention_forward)
    window = _SLIDING_WINDOW[self._pyengine_family]
    extra = {} if window is None else {"sliding_window": window(self)}
    out, weights = attention(self, query, key, value, attention_mask,
                             dropout=0.0 if not self.training else self.attention_dropout,
                             scaling=self.scaling, **extra, **kwargs)
    return self.o_proj(out.reshape(*input_shape, -1).contiguous()), weights


def _decoder_forward(self, hidden_states, attention_mask=None, position_ids=None, cache=None,
                     use_cache=False, position_embeddings=None, **kwargs):
    """HF's decoder layer forward; the residual add before post_attention_layernorm fused."""
    if "past_key_values" in kwargs:
        cache = kwargs.pop("past_key_values")
    residual = hidden_states
    hidden_states, _ = self.self_attn(hidden_states=self.input_layernorm(hidden_states),
                                      attention_mask=attention_mask, position_ids=position_ids,
                                      cache=cache, use_cache=use_cache,
                                      position_embeddings=position_embeddings, **kwargs)
    hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
    return residual + self.mlp(hidden_states)


def _mlp_forward(self, x):
    """HF's gated MLP with silu(gate) * up as one op."""
    return self.down_proj(fused_swiglu(self.gate_proj(x), self.up_proj(x)))


def _output_forward(self, hidden_states, input_tensor):
    """BERT's SelfOutput / Output: LayerNorm(dropout(dense(h)) + input), the add fused."""
    return self.LayerNorm(self.dropout(self.dense(hidden_states)), input_tensor)[0]


def _set_forward(module: nn.Module, fn) -> None:
    """Bind fn as this instance's forward (once: patching twice is patching once)."""
    if getattr(module.forward, "__func__", None) is not fn:
        module.forward = types.MethodType(fn, module)


def _replace(model: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, new)


def _is_silu(act) -> bool:
    return isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation"


def patch_model(model: nn.Module, *, rms_norm: bool = True, rope: bool = True,
                layer_norm: bool = True, swiglu: bool = True) -> nn.Module:
    """Apply the fused kernels to this model instance (in place; returns it)."""
    gemma = sorted({type(m).__name__ for m in model.modules()
                    if "Gemma" in type(m).__name__ and type(m).__name__.endswith("RMSNorm")})
    if gemma:
        raise ValueError(f"patch_model: {', '.join(gemma)} scales by (1 + weight) in its own "
                         f"dtype order; not supported (supported: {', '.join(DECODERS)} "
                         f"decoders, {', '.join(ENCODERS)} encoders)")
    kinds = {}
    for family in DECODERS:
        for cls, suffix in _classes(family, ("RMSNorm", "Attention", "DecoderLayer",
                                             "MLP")).items():
            kinds[cls] = (suffix, family)
    for family in ENCODERS:
        for cls, suffix in _classes(family, ("SelfOutput", "Output")).items():
            kinds[cls] = (suffix, family)
    found = 0
    for path, module in list(model.named_modules()):
        kind, family = kinds.get(type(module), (None, None))
        if type(module) is RMSNorm or type(module) is LayerNorm:
            found += 1
        elif kind == "RMSNorm" and rms_norm:
            _replace(model, path, RMSNorm.from_module(module))
            found += 1
        elif type(module) is nn.LayerNorm and layer_norm and len(module.normalized_shape) == 1 \
                and module.weight is not None and module.bias is not None:
            _replace(model, path, LayerNorm.from_module(module))
            found += 1
    for module in model.modules():
        kind, family = kinds.get(type(module), (None, None))
        if kind == "Attention" and rope:
            module._pyengine_family = family
            fn = _attention_forward
        elif kind == "DecoderLayer" and isinstance(module.post_attention_layernorm, RMSNorm):
            fn = _decoder_forward
        elif kind == "MLP" and swiglu and _is_silu(getattr(module, "act_fn", None)):
            fn = _mlp_forward
        elif kind in ("SelfOutput", "Output") and isinstance(getattr(module, "LayerNorm", None),
                                                             LayerNorm):
            fn = _output_forward
        else:
            continue
        found += 1
        _set_forward(module, fn)
    if not found:
        raise ValueError(f"patch_model: nothing to patch in {type(model).__name__} (supported: "
                         f"{', '.join(DECODERS)} decoders, {', '.join(ENCODERS)} encoders)")
    return model
