"""pyengine.ops.attention as a module and as a Hugging Face attention implementation.

`use_pyengine_attention(model)` makes one transformers model (Llama / Mistral / Qwen2
decoders: causal; BERT-family encoders: bidirectional with key padding) run its attention
through `hf_attention_forward`.  It registers the name "pyengine" in transformers'
AttentionInterface and AttentionMaskInterface on first use (importing pyengine registers
nothing) and switches only that model's config; other models and transformers' defaults
are unchanged.  The mask function is transformers' own FlashAttention one: our function
receives the 2-D key padding mask (bool [B, S_kv], None when nothing is padded), never an
S x S mask.  Cases the kernel does not cover (attention dropout while training, a query
length different from the key length as in cached generation, a sliding window shorter
than the sequence) run transformers' SDPA function with the equivalent mask.  Attention
logit softcapping (Gemma2's attn_logit_softcapping) is neither: such a model is refused.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from pyengine.ops.attention import attention

ATTN_NAME = "pyengine"


class Attention(nn.Module):
    """softmax(scale q k^T + mask) v over [B, H, S, D] tensors (pyengine.ops.attention)."""

    def __init__(self, causal: bool = True, scale: float | None = None,
                 backend: str | None = None):
        super().__init__()
        self.causal, self.scale, self.backend = causal, scale, backend

    def forward(self, q: Tensor, k: Tensor, v: Tensor,
                key_padding_mask: Tensor | None = None) -> Tensor:
        return attention(q, k, v, causal=self.causal, key_padding_mask=key_padding_mask,
                         scale=self.scale, backend=self.backend)


def _sdpa_fallback(module, query, key, value, mask, dropout, scaling, causal, window, **kwargs):
    """transformers' SDPA path with the 4-D bool mask our 2-D mask and flags stand for."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    q_len, kv_len = query.shape[2], key.shape[2]
    i = torch.arange(q_len, device=query.device)[:, None] + (kv_len - q_len)
    j = torch.arange(kv_len, device=query.device)[None, :]
    allowed = (j <= i) if causal else torch.ones_like(j <= i)
    if window:
        allowed = allowed & (i - j < window)
    allowed = allowed[None, None]
    if mask is not None:
        allowed = allowed & mask[:, None, None, -kv_len:]
    return sdpa_attention_forward(module, query, key, value, allowed, dropout=dropout,
                                  scaling=scaling, is_causal=False, **kwargs)


def hf_attention_forward(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                         attention_mask: Tensor | None, dropout: float = 0.0,
                         scaling: float | None = None, is_causal: bool | None = None,
                         sliding_window: int | None = None, **kwargs):
    """transformers attention function: q [B, Hq, S, D], k/v [B, Hkv, S, D], attention_mask
    the 2-D key padding mask or None -> (out [B, S, Hq, D], None)."""
    if kwargs.pop("softcap", None) is not None:
        raise ValueError(f"pyengine attention: {type(module).__name__} softcaps its attention "
                         f"logits, which pyengine attention does not do")
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError(f"pyengine attention: expected a 2-D key padding mask [B, S], got shape "
                         f"{tuple(attention_mask.shape)} (the model must build its mask with "
                         f"attn_implementation '{ATTN_NAME}')")
    q_len, kv_len = query.shape[2], key.shape[2]
    window = sliding_window if sliding_window and sliding_window < kv_len else None
    if (dropout and module.training) or q_len != kv_len or window:
        return _sdpa_fallback(module, query, key, value, attention_mask,
                              dropout if module.training else 0.0, scaling, causal, window,
                              **kwargs)
    mask = None if attention_mask is None else attention_mask.to(torch.bool)
    out = attention(query, key, value, causal=bool(causal), key_padding_mask=mask, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask
    AttentionInterface.register(ATTN_NAME, hf_attention_forward)
    AttentionMaskInterface.register(ATTN_NAME, flash_attention_mask)


def use_pyengine_attention(model: nn.Module) -> nn.Module:
    """Make this transformers model use pyengine attention (see the module docstring)."""
    if not hasattr(model, "set_attn_implementation"):
        raise ValueError(f"use_pyengine_attention: {type(model).__name__} is not a transformers "
                         f"PreTrainedModel")
    softcap = getattr(model.config, "attn_logit_softcapping", None)
    if softcap is not None:
        raise ValueError(f"use_pyengine_attention: {type(model).__name__} has "
                         f"attn_logit_softcapping = {softcap}, which pyengine attention does "
                         f"not apply; keeping {model.config._attn_implementation!r}")
    _register()
    model.set_attn_implementation(ATTN_NAME)
    return model
