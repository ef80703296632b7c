"""pyengine.patch / unpatch: run pyengine's fused kernels inside one Hugging Face model.

Explicit replacement on the given instance only (transformers' classes and functions are
never edited; other instances are unaffected).  A PEFT model (peft.get_peft_model) holds
the same HF modules, so it is patched the same way.  Parts, each a keyword of `patch`:
- cross_entropy: a Llama / Mistral / Qwen2 / Gemma / Gemma2 causal LM's forward, given
  `labels` in training mode (or skip_logits=True; eval keeps HF's logits for
  Trainer.predict / compute_metrics), computes transformers' ForCausalLMLoss (shift by
  one, ignore -100, mean over labelled tokens or sum / num_items_in_batch) with
  fused_linear_cross_entropy on the labelled positions' hidden states only, and returns
  no logits.  Gemma2's final_logit_softcapping is the op's tanh softcap; a logit
  transform the op does not have (UNSUPPORTED_LOGIT_TRANSFORMS) is refused.
- rms_norm: Llama / Mistral / Qwen2 RMSNorms become pyengine.nn.RMSNorm and each decoder
  layer's "residual + attention output -> post_attention_layernorm" one fused add + norm;
  Gemma / Gemma2 RMSNorms (fp32 x * rstd * (1 + weight)) become pyengine.nn.GemmaRMSNorm.
- rope: each decoder attention's forward applies pyengine.ops.rope, then calls the
  attention function config._attn_implementation selects, with the arguments HF's forward
  passes (so any registered attention kernel plugs in unchanged).
- swiglu: Llama / Mistral / Qwen2 MLPs with SiLU run silu(gate) * up as pyengine.ops.swiglu
  (their projections may be LoRALinear; MLPs apply_lora fused into LoRAMLP already are).
  Gemma's GeGLU MLPs are left alone.
- layer_norm: every nn.LayerNorm over one dimension becomes pyengine.nn.LayerNorm, and
  BERT / RoBERTa `SelfOutput` / `Output` blocks add their residual inside it.
- attention: use_pyengine_attention on the model (skipped, with a warning, where it refuses,
  e.g. Gemma2's attention logit softcapping).
- lora: pyengine.peft_lora.patch_peft_lora (PEFT LoRA layers through our LoRA ops), on a
  model holding PEFT modules.
Idempotent.  unpatch puts back every replaced module (sharing the same Parameters) and
removes every forward pyengine bound on an instance: state-dict keys never change.
"""
from __future__ import annotations

import functools
import importlib
import logging
import sys
import types

import torch
from torch import nn

from pyengine.data import IGNORE
from pyengine.nn.norms import GemmaRMSNorm, LayerNorm, RMSNorm
from pyengine.ops import fused_linear_cross_entropy
from pyengine.ops.rope import rope as fused_rope
from pyengine.ops.swiglu import swiglu as fused_swiglu

log = logging.getLogger(__name__)
DECODERS = ("llama", "mistral", "qwen2", "gemma", "gemma2")  # transformers.models.<name>
ENCODERS = ("bert", "roberta")
# the extra keywords HF's attention forward passes to the attention function, per family
_ATTENTION_EXTRA = {
    "llama": lambda attn: {},
    "gemma": lambda attn: {},
    "mistral": lambda attn: {"sliding_window": getattr(attn.config, "sliding_window", None)},
    "qwen2": lambda attn: {"sliding_window": attn.sliding_window},
    "gemma2": lambda attn: {"sliding_window": attn.sliding_window,
                            "softcap": attn.attn_logit_softcapping},
}
# config keys of logit transforms in transformers' causal-LM forwards that the fused loss
# does not apply (Cohere, Granite, ...): refused rather than a silently different loss
UNSUPPORTED_LOGIT_TRANSFORMS = ("logit_scale", "logits_scaling", "output_multiplier",
                                "lm_head_multiplier")
SUPPORTED = f"{', '.join(DECODERS)} decoders, {', '.join(ENCODERS)} encoders"


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
    """HF's Llama / Mistral / Qwen2 / Gemma(2) attention forward with the fused RoPE."""
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
    out, weights = attention(self, query, key, value, attention_mask,
                             dropout=0.0 if not self.training else self.attention_dropout,
                             scaling=self.scaling, **_ATTENTION_EXTRA[self._pyengine_family](self),
                             **kwargs)
    return self.o_proj(out.reshape(*input_shape, -1).contiguous()), weights


def _decoder_forward(self, *args, **kwargs):
    """The decoder layer's forward (_decoder_layer), checkpointed when gradient
    checkpointing is on, as transformers' GradientCheckpointingLayer does for the class
    forward this instance-level forward bypasses (else checkpointing would silently stop)."""
    if getattr(self, "gradient_checkpointing", False) and self.training \
            and torch.is_grad_enabled():
        kwargs["use_cache"] = False  # the replay in backward must not write the cache again
        for name in ("cache", "past_key_values"):
            kwargs.pop(name, None)
        return self._gradient_checkpointing_func(functools.partial(_decoder_layer, self,
                                                                   **kwargs), *args)
    return _decoder_layer(self, *args, **kwargs)


def _decoder_layer(self, hidden_states, attention_mask=None, position_ids=None, cache=None,
                   use_cache=False, position_embeddings=None, **kwargs):
    """HF's decoder layer forward; the residual add before post_attention_layernorm fused.
    Under autocast each norm's output is cast once to the autocast dtype: its consumers
    (q / k / v, gate / up: autocast linears or pyengine LoRA ops) would each cast it anyway,
    to the same bits, and keep their own copy for backward."""
    if "past_key_values" in kwargs:
        cache = kwargs.pop("past_key_values")
    residual = hidden_states
    hidden_states, _ = self.self_attn(hidden_states=_autocast_once(self.input_layernorm(
                                          hidden_states)),
                                      attention_mask=attention_mask, position_ids=position_ids,
                                      cache=cache, use_cache=use_cache,
                                      position_embeddings=position_embeddings, **kwargs)
    hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
    return residual + self.mlp(_autocast_once(hidden_states))


def _autocast_once(x: torch.Tensor) -> torch.Tensor:
    device = x.device.type
    if x.is_floating_point() and torch.is_autocast_enabled(device):
        return x.to(torch.get_autocast_dtype(device))
    return x


def _mlp_forward(self, x):
    """HF's gated MLP with silu(gate) * up as one op."""
    return self.down_proj(fused_swiglu(self.gate_proj(x), self.up_proj(x)))


def _output_forward(self, hidden_states, input_tensor):
    """BERT's SelfOutput / Output: LayerNorm(dropout(dense(h)) + input), the add fused."""
    return self.LayerNorm(self.dropout(self.dense(hidden_states)), input_tensor)[0]


def logit_softcap(config) -> float | None:
    """The tanh softcap HF applies to this model's logits (Gemma2's final_logit_softcapping);
    ValueError for a logit transform the fused loss does not apply."""
    for key in UNSUPPORTED_LOGIT_TRANSFORMS:
        if getattr(config, key, None) not in (None, 1, 1.0):
            raise ValueError(f"{type(config).__name__}.{key} = {getattr(config, key)} scales "
                             f"the logits; pyengine's fused causal-LM loss does not apply it")
    return getattr(config, "final_logit_softcapping", None) or None


def causal_lm_loss(model, hidden, labels, *, shift_labels=None, num_items=None,
                   filter_eps=None, reduction="mean", dtype=None):
    """transformers' ForCausalLMLoss of `model`'s LM head on the decoder's last hidden states
    [B, S, H] without logits: targets labels[:, 1:] (or shift_labels, unshifted), -100
    ignored, the mean over labelled targets or the sum / num_items (gradient accumulation).
    Only labelled positions reach fused_linear_cross_entropy.  Nothing labelled: loss 0 and
    zero gradients (HF gives NaN).  dtype: cast hidden states and head to it first."""
    if shift_labels is None:
        hidden, target = hidden[:, :-1], labels[:, 1:]
    else:
        target = shift_labels
    target = target.to(hidden.device)
    keep = target != IGNORE
    hidden = hidden[keep]
    head = model.get_output_embeddings()
    weight, bias = head.weight, getattr(head, "bias", None)
    if dtype is not None:
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    if hidden.shape[0] == 0:
        return hidden.float().sum() * 0.0
    return fused_linear_cross_entropy(hidden, weight, target[keep], bias=bias,
                                      softcap=logit_softcap(model.config), reduction=reduction,
                                      num_items=num_items if reduction == "mean" else None,
                                      filter_eps=filter_eps)


def _causal_lm_forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None,
                       inputs_embeds=None, labels=None, use_cache=None, logits_to_keep=0,
                       skip_logits=None, **kwargs):
    """HF's causal-LM forward; with labels in training (or skip_logits=True), the loss from
    causal_lm_loss and no logits.  In eval mode the logits stay (Trainer.predict and
    compute_metrics read them) unless skip_logits=True."""
    if labels is None or not (self.training if skip_logits is None else skip_logits):
        return type(self).forward(self, input_ids=input_ids, attention_mask=attention_mask,
                                  position_ids=position_ids, cache=cache,
                                  inputs_embeds=inputs_embeds, labels=labels,
                                  use_cache=use_cache, logits_to_keep=logits_to_keep, **kwargs)
    from transformers.modeling_outputs import CausalLMOutputWithPast
    if "past_key_values" in kwargs:
        cache = kwargs.pop("past_key_values")
    shift_labels = kwargs.pop("shift_labels", None)
    num_items = kwargs.pop("num_items_in_batch", None)
    return_dict = kwargs.pop("return_dict", None)
    out = self.model(input_ids=input_ids, attention_mask=attention_mask,
                     position_ids=position_ids, cache=cache, inputs_embeds=inputs_embeds,
                     use_cache=use_cache, **kwargs)
    loss = causal_lm_loss(self, out.last_hidden_state, labels, shift_labels=shift_labels,
                          num_items=num_items, filter_eps=self._pyengine_ce_filter_eps)
    result = CausalLMOutputWithPast(loss=loss, logits=None, cache=out.cache,
                                    hidden_states=out.hidden_states, attentions=out.attentions)
    return result.to_tuple() if return_dict is False else result


def _set_forward(module: nn.Module, fn) -> bool:
    """Bind fn as this instance's forward (once: patching twice is patching once).  A
    forward someone else bound on the instance (TRL's fused LM head, accelerate's hooks)
    is kept: replacing it would break what it does; False then."""
    bound = module.__dict__.get("forward")
    if bound is not None and not _ours(bound):
        log.warning("pyengine.patch: %s keeps the forward already set on this instance (%s)",
                    type(module).__name__, getattr(bound, "__qualname__", bound))
        return False
    if getattr(module.forward, "__func__", None) is not fn:
        module.forward = types.MethodType(fn, module)
    return True


def _ours(bound) -> bool:
    return getattr(getattr(bound, "__func__", None), "__module__", "").startswith("pyengine.")


def _replace(model: nn.Module, path: str, new: nn.Module, old: nn.Module) -> None:
    """Put `new` at `path`; it keeps `old` (outside its submodules: no state-dict key)."""
    new.__dict__["_pyengine_original"] = old
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, new)


def _is_silu(act) -> bool:
    return isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation"


def _kinds() -> dict[type, tuple[str, str]]:
    kinds = {}
    for family in DECODERS:
        for cls, suffix in _classes(family, ("RMSNorm", "Attention", "DecoderLayer", "MLP",
                                             "ForCausalLM")).items():
            kinds[cls] = (suffix, family)
    for family in ENCODERS:
        for cls, suffix in _classes(family, ("SelfOutput", "Output")).items():
            kinds[cls] = (suffix, family)
    return kinds


def _use_attention(model: nn.Module) -> bool:
    """use_pyengine_attention on the outermost transformers model inside `model`."""
    from pyengine.nn.attention import use_pyengine_attention
    hf = next((m for m in model.modules() if hasattr(m, "set_attn_implementation")), None)
    if hf is None:
        return False
    previous = hf.config._attn_implementation
    try:
        use_pyengine_attention(hf)
    except ValueError as e:
        log.warning("%s", e)
        return False
    hf.__dict__.setdefault("_pyengine_attn_implementation", previous)
    return True


def patch(model: nn.Module, *, cross_entropy: bool = True, rms_norm: bool = True,
          rope: bool = True, swiglu: bool = True, lora: bool = True, attention: bool = True,
          layer_norm: bool = True, ce_filter_eps: float | str | None = None) -> nn.Module:
    """Run pyengine's kernels inside this model instance (in place; returns it).  The
    parts are listed in the module doc; ValueError when none applies.  ce_filter_eps: the
    fused loss's LM-head gradient filter (fused_linear_cross_entropy's filter_eps)."""
    kinds = _kinds()
    found = 0
    for path, module in list(model.named_modules()):
        kind, family = kinds.get(type(module), (None, None))
        if type(module) in (RMSNorm, GemmaRMSNorm, LayerNorm):
            found += 1
        elif kind == "RMSNorm" and rms_norm:
            new = (GemmaRMSNorm if family.startswith("gemma") else RMSNorm).from_module(module)
            _replace(model, path, new, module)
            found += 1
        elif type(module) is nn.LayerNorm and layer_norm and len(module.normalized_shape) == 1 \
                and module.weight is not None and module.bias is not None:
            _replace(model, path, LayerNorm.from_module(module), module)
            found += 1
    for module in model.modules():
        kind, family = kinds.get(type(module), (None, None))
        if kind == "ForCausalLM" and cross_entropy:
            logit_softcap(module.config)  # refuses what the fused loss cannot do
            module._pyengine_ce_filter_eps = ce_filter_eps
            fn = _causal_lm_forward
        elif kind == "Attention" and rope:
            module._pyengine_family = family
            fn = _attention_forward
        elif kind == "DecoderLayer" and type(module.post_attention_layernorm) is RMSNorm:
            fn = _decoder_forward
        elif kind == "MLP" and swiglu and _is_silu(getattr(module, "act_fn", None)):
            fn = _mlp_forward
        elif kind in ("SelfOutput", "Output") and isinstance(getattr(module, "LayerNorm", None),
                                                             LayerNorm):
            fn = _output_forward
        else:
            continue
        found += _set_forward(module, fn)
    if lora and any(type(m).__module__.startswith("peft.") for m in model.modules()):
        from pyengine.peft_lora import patch_peft_lora
        found += patch_peft_lora(model)
    if attention:
        found += _use_attention(model)
    if not found:
        raise ValueError(f"pyengine.patch: nothing to patch in {type(model).__name__} "
                         f"(supported: {SUPPORTED})")
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Undo patch on this model (in place; returns it): the original modules back (with the
    Parameters they share now), no pyengine forward or attribute left on any instance, the
    attention implementation the model had.  A model never patched is returned unchanged."""
    for path, module in list(model.named_modules()):
        old = module.__dict__.get("_pyengine_original")
        if old is not None:
            for name, param in module.named_parameters(recurse=False):
                setattr(old, name, param)
            parent, _, name = path.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, name, old)
    for module in model.modules():
        if _ours(module.__dict__.get("forward")):
            del module.__dict__["forward"]
        previous = module.__dict__.pop("_pyengine_attn_implementation", None)
        if previous is not None:
            module.set_attn_implementation(previous)
        for key in [k for k in module.__dict__ if k.startswith("_pyengine_")]:
            del module.__dict__[key]
    return model


def _patch_loaded(model, options):
    return patch(model, **(options or {}))


class _AutoPatched:
    """transformers' Auto class `_auto`, then pyengine.patch."""
    _auto = ""

    @classmethod
    def from_pretrained(cls, path, *args, patch: dict | None = None, **kwargs):
        """transformers.<_auto>.from_pretrained(path, *args, **kwargs), patched with the
        keywords in `patch` (None: every part)."""
        import transformers
        model = getattr(transformers, cls._auto).from_pretrained(path, *args, **kwargs)
        return _patch_loaded(model, patch)


class AutoModelForCausalLM(_AutoPatched):
    _auto = "AutoModelForCausalLM"


class AutoModelForSequenceClassification(_AutoPatched):
    _auto = "AutoModelForSequenceClassification"


class AutoModelForTokenClassification(_AutoPatched):
    _auto = "AutoModelForTokenClassification"
