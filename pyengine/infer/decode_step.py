"""The C++ decode step (csrc/decode.h): R token rows of one or more sequences through a whole
quantized Llama-family model in one call with the GIL released, every linear one quantized
GEMM for all rows (the weights read once per step), instead of ~20 torch calls and 4 GEMMs
per layer per sequence.  Same math as LlamaDecoder.forward's torch path (the spec), with the
same int8 activation quantization before every GEMM, so logits agree to fp32 rounding.

Built from plain tensors: the config numbers, per layer the norms and the quantized linears
(objects with .qs, .scales, .fmt, .bias and .backend, i.e. pyengine.nn.QuantLinear), the
fp32 embedding, the KV cache [slots, layers, 2, kv_heads, max_len, head_dim] (fp32 or bf16;
a single stream's [layers, ...] cache is one slot) and the RoPE table (complex64
[>= max_len, head_dim/2]).  Per-request LoRA adapters come as stacks (`set_lora`, the adapter
bank of issue 12).  `from_decoder` is the only code that knows where LlamaDecoder keeps
them.  The step holds references to every tensor it points to.
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
    """`step(token, pos)` -> fp32 logits [vocab] of the next token of slot 0 (writes k, v at
    `pos`); `run_rows(...)` -> logits [n_out, vocab] for up to `max_rows` rows at once."""

    def __init__(self, cfg, *, embed: torch.Tensor, final_norm: torch.Tensor, layers: list[dict],
                 lm_head, kv_cache: torch.Tensor, rope: torch.Tensor, max_rows: int = 1):
        if _ext._C is None:
            raise RuntimeError(f"the C++ decode step needs the extension: {_ext.EXT_ERROR}")
        self.vocab, self.max_rows, self.n_layers = cfg.vocab, max_rows, len(layers)
        self._keep, self._lora_keep = [], []
        self._shapes = cfg.linear_shapes()  # (N, K) of each linear
        if kv_cache.dim() == 5:  # one stream's cache: one slot
            kv_cache = kv_cache[None]
        slots, max_len = kv_cache.shape[0], kv_cache.shape[4]
        self._check("embed", embed, torch.float32, (cfg.vocab, cfg.hidden))
        self._check("final_norm", final_norm, torch.float32, (cfg.hidden,))
        self._check("kv_cache", kv_cache, (torch.float32, torch.bfloat16),
                    (slots, len(layers), 2, cfg.n_kv_heads, max_len, cfg.head_dim))
        rope = torch.view_as_real(rope) if rope.is_complex() else rope
        if rope.shape[0] < max_len:
            raise ValueError(f"decode step: the RoPE table has {rope.shape[0]} positions, the KV "
                             f"cache {max_len}")
        rope = rope[:max_len]
        self._check("rope", rope, torch.float32, (max_len, cfg.head_dim // 2, 2))
        if not isinstance(max_rows, int) or max_rows < 1:
            raise ValueError(f"decode step: max_rows must be an int >= 1, got {max_rows!r}")
        entries = []
        for i, layer in enumerate(layers):
            for name in LAYER_NORMS:
                self._check(f"layer {i} {name}", layer[name], torch.float32, (cfg.hidden,))
            an, mn = (layer[n].data_ptr() for n in LAYER_NORMS)
            qkv, o, gu, down = (self._linear(f"layer {i} {n}", layer[n]) for n in LAYER_LINEARS)
            entries.append((an, qkv, o, mn, gu, down))
        config = (cfg.hidden, cfg.intermediate, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim,
                  cfg.vocab, max_len, slots, float(cfg.rms_eps), _ext.dtype_code(kv_cache))
        self._step = _ext._C.DecodeStep(config, entries, embed.data_ptr(), final_norm.data_ptr(),
                                        self._linear("lm_head", lm_head), kv_cache.data_ptr(),
                                        rope.data_ptr(), max_rows)

    @staticmethod
    def _bad(name, t, dtypes, shape) -> str | None:
        """Why `t` is not a contiguous `shape` tensor of one of `dtypes` (None: it is)."""
        if t.dtype in dtypes and tuple(t.shape) == shape and t.is_contiguous():
            return None
        return (f"decode step: {name} must be a contiguous {shape} tensor of "
                f"{' or '.join(map(str, dtypes))}, got {tuple(t.shape)} {t.dtype}"
                f"{'' if t.is_contiguous() else ' (not contiguous)'}")

    def _check(self, name, t, dtypes, shape):
        dtypes = dtypes if isinstance(dtypes, tuple) else (dtypes,)
        if (error := self._bad(name, t, dtypes, shape)) is not None:
            raise ValueError(error)
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

    def set_lora(self, stacks: list[dict] | None) -> None:
        """The adapter bank: per layer {"qkv" | "o" | "gate_up" | "down": (a, b) or None},
        a [n_adapters, rank, K], b [n_adapters, N, rank] fp32 contiguous (every stack the same
        n_adapters; ranks may differ per linear).  None or []: no adapters.  Replaces the
        previous stacks; run_rows' adapter indices then range over [0, n_adapters)."""
        stacks = stacks or []
        if len(stacks) not in (0, self.n_layers):
            raise ValueError(f"decode step: LoRA stacks for {len(stacks)} layers, the model has "
                             f"{self.n_layers}")
        entries, keep, counts = [], [], set()
        for i, layer in enumerate(stacks):
            if unknown := set(layer) - set(LAYER_LINEARS):
                raise ValueError(f"decode step: layer {i} LoRA keys {sorted(unknown)} (allowed: "
                                 f"{', '.join(LAYER_LINEARS)})")
            entry = []
            for name in LAYER_LINEARS:
                pair = layer.get(name)
                if pair is None:
                    entry.append((0, 0, 0, 0))
                    continue
                a, b = pair
                n, k = self._shapes[name]
                count, rank = (a.shape[0], a.shape[1]) if a.dim() == 3 else (0, 0)
                for what, t, shape in (("a", a, (count, rank, k)), ("b", b, (count, n, rank))):
                    if (error := self._bad(f"layer {i} {name} LoRA {what}", t, (torch.float32,),
                                           shape)) is not None:
                        raise ValueError(error)
                counts.add(count)
                keep += [a, b]
                entry.append((a.data_ptr(), b.data_ptr(), count, rank))
            entries.append(entry)
        if len(counts) > 1:
            raise ValueError(f"decode step: the LoRA stacks hold different adapter counts "
                             f"{sorted(counts)}; every stack must hold all adapters")
        self._step.set_lora(entries)
        self._lora_keep = keep

    def run_rows(self, tokens: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor,
                 adapters: torch.Tensor, logit_rows: torch.Tensor,
                 gemm_from: int | None = None) -> torch.Tensor:
        """R rows (int64 [R] each: token, KV cache slot, position, adapter index or -1) through
        the model; writes every row's k, v at (slot, position), then each row attends over its
        slot's positions 0..position (rows of one slot at consecutive positions: a prefill
        chunk).  -> fp32 logits [n_out, vocab] of the rows in logit_rows (int64 [n_out]).
        The caller owns the cache contents (a row attends to whatever its slot holds before
        its position).  Rows from `gemm_from` on (prefill chunks; default: none), when at
        least GEMM_MIN_ROWS (96) and AMX is active, run the AMX bf16 GEMM (csrc/decode.h)."""
        args = {"tokens": tokens, "slots": slots, "positions": positions, "adapters": adapters,
                "logit_rows": logit_rows}
        for name, t in args.items():
            if not isinstance(t, torch.Tensor) or t.dtype != torch.int64 or t.dim() != 1:
                got = (f"{tuple(t.shape)} {t.dtype}" if isinstance(t, torch.Tensor)
                       else type(t).__name__)
                raise ValueError(f"decode step: {name} must be a 1-D int64 tensor, got {got}")
        rows = tokens.shape[0]
        if any(t.shape[0] != rows for t in (slots, positions, adapters)):
            raise ValueError(f"decode step: tokens, slots, positions, adapters must have one "
                             f"length, got {[t.shape[0] for t in (tokens, slots, positions, adapters)]}")
        tokens, slots, positions, adapters, logit_rows = (t.contiguous() for t in args.values())
        logits = torch.empty(logit_rows.shape[0], self.vocab, dtype=torch.float32)
        self._step.run_rows(tokens.data_ptr(), slots.data_ptr(), positions.data_ptr(),
                            adapters.data_ptr(), rows, logit_rows.data_ptr(), logit_rows.shape[0],
                            rows if gemm_from is None else gemm_from, logits.data_ptr(),
                            _ext.num_threads())
        return logits

    def __call__(self, token: int, pos: int) -> torch.Tensor:
        logits = torch.empty(self.vocab, dtype=torch.float32)
        self._step.run(token, pos, logits.data_ptr(), _ext.num_threads())
        return logits


def from_decoder(model, kv_cache: torch.Tensor | None = None,
                 max_rows: int = 1) -> DecodeStep | None:
    """The step for a LlamaDecoder whose every linear (LM head included) is quantized in one
    format on the cpu backend, with fp32 embedding and norms and head_dim a multiple of 16;
    None otherwise.  kv_cache [slots, layers, 2, kv_heads, max_len, head_dim] replaces the
    model's own cache (the model's RoPE table must cover max_len: model.reserve)."""
    layers = [{"attn_norm": l.attn_norm, "qkv": l.qkv, "o": l.o, "mlp_norm": l.mlp_norm,
               "gate_up": l.gate_up, "down": l.down} for l in model.layers]
    linears = [l[n] for l in layers for n in LAYER_LINEARS] + [model.lm_head]
    embed = model.embed.weight
    if (_ext._C is None or not all(map(_is_c_quant, linears)) or model.cfg.head_dim % 16 or model.cfg.head_dim > 512
            or len({l.fmt for l in linears}) != 1 or embed.dtype != torch.float32):
        return None
    return DecodeStep(model.cfg, embed=embed, final_norm=model.norm, layers=layers,
                      lm_head=model.lm_head,
                      kv_cache=model.kv_cache if kv_cache is None else kv_cache,
                      rope=model.rope, max_rows=max_rows)
