"""Continuous batching over one LlamaDecoder's weights: many sequences per step, each in
its own KV-cache slot, each with its own LoRA adapter applied without merging.

    engine = BatchDecoder(model, slots=8, max_len=2048)
    engine.add_adapter("support", "adapters/support")   # PEFT LoRA directory
    logits = engine.step([Chunk(slot=0, start=0, tokens=prompt_ids, adapter="support"),
                          Chunk(slot=1, start=17, tokens=[next_id])])   # -> [2, vocab] fp32

A step runs R rows (the tokens of every chunk, flattened).  Every linear runs once over
all R rows, so its weight is read once per step for the whole batch (on a
bandwidth-bound CPU this is where batching wins); the k, v of every row are written to
its slot's cache first, then each row attends over its slot's positions [0, pos], so a
prefill chunk (rows of one slot at consecutive positions) is causal by construction and
decode rows (one token each) mix with it freely.  Only the last row of each chunk goes
through the final norm and the LM head.

LoRA (S-LoRA / Punica style): each linear's output gets  + B[a] @ (A[a] @ x)  for a row
whose sequence uses adapter a (pyengine.ops.lora_gather).  AdapterBank keeps, per layer
and fused linear, all loaded adapters stacked: A [n, rank, K], B [n, N, rank], PEFT's
scaling folded into B, q/k rows permuted like the base weight (RoPE pairs), the parts of
a fused linear stacked along the rank (qkv: A = [A_q; A_k; A_v], B block-diagonal), ranks
zero-padded to the largest.  Greedy tokens through an fp32 model equal the merged
model's (W + s B A) x up to fp32 rounding.

KV cache: [slots, layers, 2, kv_heads, max_len, head_dim] in the model's kv_dtype (the
single-stream LlamaDecoder cache is the one-slot case).  Backends: quantized models whose
linears the C++ kernels serve run the step in C++ (pyengine.infer.decode_step: one call per
step, GIL released); the rest runs `forward_torch` below, the spec.

Floor per step: every weight once (+ each used adapter's A and B once) + each row's
attended cache + 2 * params FLOPs per row.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from itertools import accumulate
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from pyengine.infer.model import LlamaDecoder
from pyengine.ops.lora_gather import lora_gather
from pyengine.infer.weights import ModelLoadError, WeightTable, rope_heads, interleave_rope_rows

__all__ = ["AdapterBank", "BatchDecoder", "Chunk"]


@dataclass(frozen=True)
class Chunk:
    """`tokens` of the sequence in `slot`, at positions start .. start + len - 1 (`start`:
    the tokens its cache already holds; 0 starts a new sequence there)."""
    slot: int
    start: int
    tokens: Sequence[int]
    adapter: str | None = None


class AdapterBank:
    """The loaded LoRA adapters of one decoder, by name, as per-layer stacks (module doc).
    `stacks[layer][linear]` is (A [n, rank, K], B [n, N, rank]) fp32, or None when no adapter
    touches that linear; `index(name)` is the adapter's position in the stacks."""

    def __init__(self, model: LlamaDecoder):
        c = model.cfg
        self.cfg, self.table, self.parts = c, WeightTable(c.n_layers), c.linear_parts()
        self.adapters: dict[str, list[dict[str, tuple[torch.Tensor, torch.Tensor]]]] = {}
        self.stacks: list[dict[str, tuple[torch.Tensor, torch.Tensor] | None]] = self._stack()

    @property
    def names(self) -> list[str]:
        return list(self.adapters)

    def index(self, name: str | None) -> int:
        return -1 if name is None else self.names.index(name)

    def add(self, name: str, directory: str | Path) -> None:
        if name in self.adapters:
            raise ValueError(f"adapter '{name}' is already loaded")
        self.adapters[name] = self._read(directory)
        self.stacks = self._stack()

    def remove(self, name: str) -> None:
        del self.adapters[name]
        self.stacks = self._stack()

    def _read(self, directory) -> list[dict[str, tuple[torch.Tensor, torch.Tensor]]]:
        """Per layer, per fused linear: (A [R, K], B [N, R]) of this adapter (scaled, rows
        permuted, parts stacked along R), for the linears it adapts."""
        from pyengine.lora import AdapterError, read_adapter

        try:
            adapter = read_adapter(directory)
        except (AdapterError, FileNotFoundError) as e:
            raise ModelLoadError(str(e)) from e
        where = adapter.weights_file
        if adapter.extra:
            raise ModelLoadError(f"{where}: modules_to_save tensors ({', '.join(adapter.extra)}) "
                                 "replace base weights; a served adapter may only add LoRA deltas "
                                 "(merge it with pyengine.infer --adapter instead)")
        c, table, parts = self.cfg, self.table, {}
        for path, (a, b) in adapter.lora.items():
            w = table.by_hf.get(path + ".weight")
            if w is None or w.ours.removesuffix(".weight").rpartition(".")[2] not in self.parts:
                raise ModelLoadError(f"{where}: {adapter.keys[path]} adapts {path}, which is not "
                                     "a linear layer of a decoder block (q/k/v/o_proj, "
                                     f"gate/up/down_proj) of this {c.n_layers}-layer model")
            parts[w.hf] = (a, b, adapter.scaling(path))
        out = []
        for i in range(c.n_layers):
            layer = {}
            for linear, (heights, k) in self.parts.items():
                names = table.by_ours[f"layers.{i}.{linear}.weight"]
                present = [(w, row, h) for w, row, h in zip(names, _offsets(heights), heights)
                           if w.hf in parts]
                if not present:
                    continue
                ranks = [parts[w.hf][0].shape[0] for w, _, _ in present]
                A = torch.zeros(sum(ranks), k)
                B = torch.zeros(sum(heights), sum(ranks))
                for (w, row, h), col, r in zip(present, _offsets(ranks), ranks):
                    a, b, scale = parts[w.hf]
                    if tuple(a.shape) != (r, k) or tuple(b.shape) != (h, r):
                        raise ModelLoadError(f"{where}: LoRA of {w.hf.removesuffix('.weight')} is "
                                             f"A {list(a.shape)} B {list(b.shape)}; the layer is "
                                             f"[{h}, {k}], so A must be [{r}, {k}] and B [{h}, {r}]")
                    b = b.float() * scale
                    heads = rope_heads(w, c.n_heads, c.n_kv_heads)
                    A[col:col + r] = a.float()
                    B[row:row + h, col:col + r] = b if heads is None else interleave_rope_rows(b, heads)
                layer[linear] = (A, B)
            out.append(layer)
        return out

    def _stack(self):
        stacks = []
        for i in range(self.cfg.n_layers):
            layer = {}
            for linear, (n, k) in self.cfg.linear_shapes().items():
                own = [a[i].get(linear) for a in self.adapters.values()]
                rank = max((ab[0].shape[0] for ab in own if ab is not None), default=0)
                if rank == 0:
                    layer[linear] = None
                    continue
                A = torch.zeros(len(own), rank, k)
                B = torch.zeros(len(own), n, rank)
                for j, ab in enumerate(own):
                    if ab is not None:
                        A[j, :ab[0].shape[0]] = ab[0]
                        B[j, :, :ab[1].shape[1]] = ab[1]
                layer[linear] = (A, B)
            stacks.append(layer)
        return stacks


def _offsets(sizes) -> list[int]:
    """Where each of `sizes` starts when they are laid end to end."""
    return list(accumulate(sizes, initial=0))[:-1]


def lora_delta(x: torch.Tensor, stack, idx: torch.Tensor) -> torch.Tensor | None:
    """B[idx] @ (A[idx] @ x) per row (0 for idx -1), or None when no row has an adapter."""
    if stack is None or not bool((idx >= 0).any()):
        return None
    return lora_gather(x, stack[0], stack[1], idx)


class BatchDecoder:
    """Runs steps of chunks (module doc) over `slots` KV-cache slots of `max_len` positions;
    at most `max_rows` tokens a step.  step / add_adapter / remove_adapter must not run
    concurrently (a lock makes that an error-free wait)."""

    def __init__(self, model: LlamaDecoder, *, slots: int, max_len: int, max_rows: int | None = None):
        if slots < 1 or max_len < 1:
            raise ValueError(f"slots and max_len must be >= 1, got {slots} and {max_len}")
        c = model.cfg
        self.model, self.slots, self.max_len = model, slots, max_len
        self.max_rows = max_rows or slots + 256
        model.reserve(max_len)  # the RoPE table (and the model's own one-slot cache)
        self.kv_cache = torch.zeros(slots, c.n_layers, 2, c.n_kv_heads, max_len, c.head_dim,
                                    dtype=model.kv_dtype)
        self.bank = AdapterBank(model)
        self._lock = threading.Lock()
        from pyengine.infer.decode_step import from_decoder
        # the C++ step (quantized models) or None (forward_torch)
        self.c_step = from_decoder(model, kv_cache=self.kv_cache, max_rows=self.max_rows)

    @property
    def adapter_names(self) -> list[str]:
        return self.bank.names

    def add_adapter(self, name: str, directory: str | Path) -> None:
        with self._lock:
            self.bank.add(name, directory)
            self._bank_changed()

    def remove_adapter(self, name: str) -> None:
        with self._lock:
            self.bank.remove(name)
            self._bank_changed()

    def _bank_changed(self) -> None:
        if self.c_step is not None:
            self.c_step.set_lora(self.bank.stacks)

    def _rows(self, chunks: Sequence[Chunk], order: Sequence[int]):
        """(tokens, slots, positions, adapters, last rows) of `chunks`, checked; chunks[j] is
        the caller's chunk order[j] (for messages)."""
        vocab, seen = self.model.cfg.vocab, set()
        tokens, slots, positions, adapters, last = [], [], [], [], []
        for i, ch in zip(order, chunks):
            n = len(ch.tokens)
            if not 0 <= ch.slot < self.slots:
                raise ValueError(f"chunk {i}: slot {ch.slot} outside [0, {self.slots})")
            if ch.slot in seen:
                raise ValueError(f"chunk {i}: slot {ch.slot} appears twice in one step")
            seen.add(ch.slot)
            if n == 0 or ch.start < 0 or ch.start + n > self.max_len:
                raise ValueError(f"chunk {i}: {n} tokens at {ch.start} must be 1+ tokens within "
                                 f"the KV cache [0, {self.max_len})")
            bad = [t for t in ch.tokens if not 0 <= t < vocab]
            if bad:
                raise ValueError(f"chunk {i}: token id {bad[0]} outside the vocabulary [0, {vocab})")
            if ch.adapter is not None and ch.adapter not in self.bank.adapters:
                raise KeyError(f"chunk {i}: adapter '{ch.adapter}' is not loaded")
            tokens += ch.tokens
            slots += [ch.slot] * n
            positions += range(ch.start, ch.start + n)
            adapters += [self.bank.index(ch.adapter)] * n
            last.append(len(tokens) - 1)
        if len(tokens) > self.max_rows:
            raise ValueError(f"step: {len(tokens)} tokens exceed max_rows {self.max_rows}")
        return [torch.tensor(v, dtype=torch.long) for v in (tokens, slots, positions, adapters, last)]

    @torch.inference_mode()
    def step(self, chunks: Sequence[Chunk]) -> torch.Tensor:
        """fp32 logits [len(chunks), vocab] after each chunk's last token."""
        # one-token chunks (decode) first: the C++ step may run the rows after them (prefill)
        # on its AMX GEMM; the logits come back in the callers' order
        if not chunks:
            raise ValueError("step: no chunks")
        order = sorted(range(len(chunks)), key=lambda i: len(chunks[i].tokens) > 1)
        chunks = [chunks[i] for i in order]
        with self._lock:
            rows = self._rows(chunks, order)
            if self.c_step is not None:
                decode_rows = sum(len(ch.tokens) == 1 for ch in chunks)
                logits = self.c_step.run_rows(*rows, gemm_from=decode_rows)
            else:
                logits = self.forward_torch(chunks, *rows)
        if order == sorted(order):
            return logits
        return logits[torch.tensor(order).argsort()]

    def forward_torch(self, chunks, tokens, slots, positions, adapters, last) -> torch.Tensor:
        """The spec: LlamaDecoder.forward_torch's math over rows of many slots, plus LoRA."""
        m, c = self.model, self.model.cfg
        R = tokens.shape[0]
        nh, nkv, hd, eps, hidden = c.n_heads, c.n_kv_heads, c.head_dim, c.rms_eps, (c.hidden,)
        groups, qk_width, q_width = nh // nkv, (nh + nkv) * hd, nh * hd
        rope = m.rope[positions, None, :]  # [R, 1, d/2]
        spans, row = [], 0
        for ch in chunks:  # (slot, first row, rows, attended length, causal mask or None)
            n, end = len(ch.tokens), ch.start + len(ch.tokens)
            mask = None if n == 1 else torch.ones(n, end, dtype=torch.bool).tril_(ch.start)
            spans.append((ch.slot, row, n, end, mask))
            row += n
        x = m.embed(tokens)
        rope_in_fp32 = x.dtype != torch.float32
        for li, layer in enumerate(m.layers):
            attn_norm, qkv_proj, o_proj, mlp_norm, gate_up_proj, down_proj = layer.steps
            lora = self.bank.stacks[li]

            def linear(proj, name, inp):
                y = proj(inp)
                delta = lora_delta(inp, lora[name], adapters)
                return y if delta is None else y + delta.to(y.dtype)

            qkv = linear(qkv_proj, "qkv", F.rms_norm(x, hidden, attn_norm, eps))
            qk = qkv[:, :qk_width].view(R, nh + nkv, hd // 2, 2)
            if rope_in_fp32:
                qk.copy_(torch.view_as_real(torch.view_as_complex(qk.float()) * rope))
            else:
                torch.view_as_complex(qk).mul_(rope)
            kv = self.kv_cache[:, li]  # [slots, 2, kv_heads, max_len, head_dim]
            kv[slots, :, :, positions] = qkv[:, q_width:].view(R, 2, nkv, hd).to(kv.dtype)
            attn = torch.empty(R, q_width, dtype=qkv.dtype)
            for slot, r0, n, end, mask in spans:
                keys, values = kv[slot, :, None, :, :end].to(qkv.dtype)  # [1, kv_heads, end, d]
                q = qkv[r0:r0 + n, :q_width].view(n, nh, hd).transpose(0, 1)[None]
                a = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask,
                                                   enable_gqa=groups > 1)
                attn[r0:r0 + n] = a[0].transpose(0, 1).reshape(n, q_width)
            x = x + linear(o_proj, "o", attn)
            gate, up = linear(gate_up_proj, "gate_up", F.rms_norm(x, hidden, mlp_norm, eps)).chunk(2, -1)
            x = x + linear(down_proj, "down", F.silu(gate) * up)
        return m.lm_head(F.rms_norm(x[last], hidden, m.norm, eps)).float()
