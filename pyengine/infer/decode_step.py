"""The C++ decode step (csrc/decode.h): one token through a whole quantized Llama-family
model in one call with the GIL released, instead of ~20 torch calls and 4 GEMV calls per
layer.  Same math as LlamaDecoder.forward's torch path (the spec), with the same int8
activation quantization before every GEMV, so logits agree to fp32 rounding.

Built from plain tensors: the config numbers, per layer the norms and the quantized linears
(objects with .qs, .scales, .fmt, .bias and .backend, i.e. pyengine.nn.QuantLinear), the
fp32 embedding, the KV cache [layers, 2, kv_heads, max_len, head_dim] (fp32 or bf16) and the
RoPE table (complex64 [max_len, head_dim/2]).  `from_decoder` is the only code that knows
where LlamaDecoder keeps them.  The step holds references to every tensor it points to.
"""
from __future__ import annotations

import torch

from pyengine import _ext
from pyengine.ops.quant import FMT_CODES
from pyengine.quant import format_spec

LAYER_NORMS = ("attn_norm", "mlp_norm")
LAYER_LINEARS = ("qkv", "o", "gate_up", "down")


def _is_c_quant(linear) -> bool:
    """A quantized linear that the C++ kernel serves (QuantLinear on the cpu backend)."""
    return getattr(linear, "backend", None) == "cpu" and getattr(linear, "fmt", None) in FMT_CODES


class DecodeStep:
    """`step(token, pos)` -> fp32 logits [vocab] of the next token; writes k, v at `pos`."""

    def __init__(self, cfg, *, embed: torch.Tensor, final_norm: torch.Tensor, layers: list[dict],
                 lm_head, kv_cache: torch.Tensor, rope: torch.Tensor):
        if _ext._C is None:
            raise RuntimeError(f"the C++ decode step needs the extension: {_ext.EXT_ERROR}")
        self.vocab, self._keep = cfg.vocab, []
        max_len = kv_cache.shape[3]
        self._check("embed", embed, torch.float32, (cfg.vocab, cfg.hidden))
        self._check("final_norm", final_norm, torch.float32, (cfg.hidden,))
        self._check("kv_cache", kv_cache, (torch.float32, torch.bfloat16),
                    (len(layers), 2, cfg.n_kv_heads, max_len, cfg.head_dim))
        rope = torch.view_as_real(rope) if rope.is_complex() else rope
        self._check("rope", rope, torch.float32, (max_len, cfg.head_dim // 2, 2))
        entries = []
        for i, layer in enumerate(layers):
            for name in LAYER_NORMS:
                self._check(f"layer {i} {name}", layer[name], torch.float32, (cfg.hidden,))
            an, mn = (layer[n].data_ptr() for n in LAYER_NORMS)
            qkv, o, gu, down = (self._linear(f"layer {i} {n}", layer[n]) for n in LAYER_LINEARS)
            entries.append((an, qkv, o, mn, gu, down))
        config = (cfg.hidden, cfg.intermediate, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim,
                  cfg.vocab, max_len, float(cfg.rms_eps), _ext.dtype_code(kv_cache))
        self._step = _ext._C.DecodeStep(config, entries, embed.data_ptr(), final_norm.data_ptr(),
                                        self._linear("lm_head", lm_head), kv_cache.data_ptr(),
                                        rope.data_ptr())

    def _check(self, name, t, dtypes, shape):
        dtypes = dtypes if isinstance(dtypes, tuple) else (dtypes,)
        if t.dtype not in dtypes or tuple(t.shape) != shape or not t.is_contiguous():
            raise ValueError(f"decode step: {name} must be a contiguous {shape} tensor of "
                             f"{' or '.join(map(str, dtypes))}, got {tuple(t.shape)} {t.dtype}"
                             f"{'' if t.is_contiguous() else ' (not contiguous)'}")
        self._keep.append(t)

    def _linear(self, name, linear):
        if not _is_c_quant(linear):
            raise ValueError(f"decode step: {name} is not a quantized linear on the cpu backend "
                             f"(got {type(linear).__name__})")
        n, k = linear.qs.shape[0], linear.scales.shape[1] * format_spec(linear.fmt).block
        for t in (linear.qs, linear.scales):
            if not t.is_contiguous():
                raise ValueError(f"decode step: {name} quantized planes must be contiguous")
        bias = linear.bias
        if bias is not None:
            bias = bias.detach().float().contiguous()
            self._check(f"{name} bias", bias, torch.float32, (n,))
        self._keep += [linear.qs, linear.scales]
        return (FMT_CODES[linear.fmt], linear.qs.data_ptr(), linear.scales.data_ptr(), n, k,
                _ext.ptr(bias))

    def __call__(self, token: int, pos: int) -> torch.Tensor:
        logits = torch.empty(self.vocab, dtype=torch.float32)
        self._step.run(token, pos, logits.data_ptr(), _ext.num_threads())
        return logits


def from_decoder(model) -> DecodeStep | None:
    """The step for a LlamaDecoder whose every linear (LM head included) is quantized in one
    format on the cpu backend, with fp32 embedding and norms and head_dim a multiple of 16;
    None otherwise."""
    layers = [{"attn_norm": l.attn_norm, "qkv": l.qkv, "o": l.o, "mlp_norm": l.mlp_norm,
               "gate_up": l.gate_up, "down": l.down} for l in model.layers]
    linears = [l[n] for l in layers for n in LAYER_LINEARS] + [model.lm_head]
    embed = model.embed.weight
    if (_ext._C is None or not all(map(_is_c_quant, linears)) or model.cfg.head_dim % 16
            or len({l.fmt for l in linears}) != 1 or embed.dtype != torch.float32):
        return None
    return DecodeStep(model.cfg, embed=embed, final_norm=model.norm, layers=layers,
                      lm_head=model.lm_head, kv_cache=model.kv_cache, rope=model.rope)
