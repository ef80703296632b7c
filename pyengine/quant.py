"""Weight-only quantization formats: q8_0, q4_0 (GGUF block layouts) and nf4 (QLoRA).

    w [N, K] (out, in) is cut along K into blocks; each block has one fp16 scale d.
    q8_0: 32 weights, q = round(w / d) int8, d = absmax / 127             (8.5 bits/weight)
    q4_0: 32 weights, q = trunc(w / d + 8.5) in [0, 15], d = m / -8 where m is the
          signed value of largest magnitude; w ~ d * (q - 8)                (4.5 bits/weight)
    nf4:  64 weights, q = nearest NF4 code of w / d, d = absmax; w ~ d * NF4[q]  (4.25)

The formulas are ggml's (ggml-quants.c reference quantizers, round half away from zero
for q8_0), so `gguf_blocks()` equals what `gguf.quants.quantize` writes byte for byte.
GGUF block layout: [fp16 d][quants]; q8_0 quants are 32 int8, q4_0 quants are 16 bytes
where byte j holds q[j] (low nibble) and q[j+16] (high nibble).  nf4 (no GGUF type) uses
the same scheme with 64 weights: [fp16 d][32 bytes, byte j = q[j] | q[j+32] << 4].

In memory a QuantizedWeight keeps the blocks in the layout the kernels read (repacked
once, at quantize / load time): `scales` fp16 [N, K / block] and `qs` uint8
[N, K * bits / 8] where, per row, each group of 16 consecutive blocks is interleaved in
4-byte words: word c of block l of the group sits at (c * n + l) * 4 within the group
(n = 16, or the block count of the row's last, partial group).  One 64-byte load then
holds word c of 16 blocks, so a SIMD lane accumulates one block's integer dot product.
`gguf_blocks()` / `from_gguf_blocks()` convert losslessly to and from the GGUF bytes.
Files: safetensors with tensors "qs" and "scales" and metadata {fmt, shape}.
The format table (block, bits, zero point, codebook) is pyengine.quant_formats.FORMATS,
the one definition the Python, Triton and C++ code all read.
"""
from __future__ import annotations

import json
import logging
import os

import torch
from torch import Tensor

from pyengine.quant_formats import FORMATS, NF4_CODEBOOK, FormatSpec  # noqa: F401 (re-exported)

log = logging.getLogger("pyengine")


WEIGHT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def format_spec(fmt: str) -> FormatSpec:
    if fmt not in FORMATS:
        raise ValueError(f"unknown quant format {fmt!r} (choose from {', '.join(FORMATS)})")
    return FORMATS[fmt]


def _round_half_away(v: Tensor) -> Tensor:
    """C roundf: ties away from zero (ggml rounds q8_0 this way; torch.round is to-even)."""
    a = v.abs()
    f = torch.floor(a)
    return torch.sign(v) * (f + torch.floor(2 * (a - f)))


def _safe_inverse(d: Tensor) -> Tensor:
    return torch.where(d == 0, torch.zeros_like(d), 1.0 / torch.where(d == 0, torch.ones_like(d), d))


def _pack_nibbles(q: Tensor, half: int) -> Tensor:
    """q uint8 [..., nb, 2*half] in 0..15 -> [..., nb, half]: byte j = q[j] | q[j+half] << 4."""
    return q[..., :half] | (q[..., half:] << 4)


def _unpack_nibbles(b: Tensor) -> Tensor:
    return torch.cat([b & 15, b >> 4], dim=-1)


def _quants(spec: FormatSpec, q: Tensor) -> Tensor:
    """Quant bytes [..., nb, quant_bytes] in block order -> the quants [..., nb, block]."""
    if spec.bits == 8:
        return q.view(torch.int8) if spec.signed else q
    return _unpack_nibbles(q)


def _check_weight(weight: Tensor, spec: FormatSpec, fmt: str) -> None:
    if not isinstance(weight, Tensor):
        raise TypeError(f"quantize: weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dtype not in WEIGHT_DTYPES:
        raise TypeError(f"quantize: weight dtype {weight.dtype} not supported "
                        f"(float32, bfloat16, float16)")
    if weight.dim() != 2:
        raise ValueError(f"quantize: weight must be 2-D [out, in], got shape {tuple(weight.shape)}")
    k = weight.shape[1]
    if k % spec.block:
        raise ValueError(f"quantize({fmt}): in_features K={k} is not a multiple of the block "
                         f"size {spec.block}")
    if not bool(torch.isfinite(weight).all()):
        raise ValueError(f"quantize({fmt}): weight has non-finite values")


def quantize(weight: Tensor, fmt: str) -> "QuantizedWeight":
    """Quantize a [N, K] weight (fp32/bf16/fp16, K a multiple of the block size)."""
    spec = format_spec(fmt)
    _check_weight(weight, spec, fmt)
    n, k = weight.shape
    blocks = weight.detach().to("cpu", torch.float32).reshape(n, k // spec.block, spec.block)
    if fmt == "q8_0":
        d = blocks.abs().amax(-1, keepdim=True) / 127
        q = _round_half_away(blocks * _safe_inverse(d)).to(torch.int8)
        qs = q.view(torch.uint8)
    elif fmt == "q4_0":
        idx = blocks.abs().argmax(-1, keepdim=True)
        d = torch.gather(blocks, -1, idx) / -8
        q = torch.trunc(blocks * _safe_inverse(d) + 8.5).clamp(0, 15).to(torch.uint8)
        qs = _pack_nibbles(q, spec.block // 2)
    else:  # nf4: normalise by the fp16-rounded absmax, then nearest code
        d = blocks.abs().amax(-1, keepdim=True).to(torch.float16).float()
        code = torch.tensor(NF4_CODEBOOK)
        mid = (code[1:] + code[:-1]) / 2
        q = torch.bucketize(blocks * _safe_inverse(d), mid).to(torch.uint8)
        qs = _pack_nibbles(q, spec.block // 2)
    return QuantizedWeight(fmt, (n, k), interleave_groups(qs.reshape(n, -1, spec.quant_bytes)),
                           d.reshape(n, -1).to(torch.float16).contiguous())


class QuantizedWeight:
    """A quantized [N, K] weight in the two-plane layout (see module doc)."""

    def __init__(self, fmt: str, shape: tuple[int, int], qs: Tensor, scales: Tensor):
        self.spec = format_spec(fmt)
        self.fmt = fmt
        self.shape = (int(shape[0]), int(shape[1]))
        self.qs, self.scales = qs, scales
        self._validate("QuantizedWeight")

    def _validate(self, where: str) -> None:
        n, k = self.shape
        spec = self.spec
        if n < 0 or k <= 0 or k % spec.block:
            raise ValueError(f"{where}: shape {self.shape} invalid for {self.fmt} "
                             f"(K must be a positive multiple of {spec.block})")
        want_qs, want_sc = (n, k // spec.block * spec.quant_bytes), (n, k // spec.block)
        if self.qs.dtype != torch.uint8 or tuple(self.qs.shape) != want_qs:
            raise ValueError(f"{where}: qs must be uint8 {want_qs} for {self.fmt} {self.shape}, "
                             f"got {self.qs.dtype} {tuple(self.qs.shape)}")
        if self.scales.dtype != torch.float16 or tuple(self.scales.shape) != want_sc:
            raise ValueError(f"{where}: scales must be float16 {want_sc} for {self.fmt} "
                             f"{self.shape}, got {self.scales.dtype} {tuple(self.scales.shape)}")

    # ------------------------------------------------------------------ properties
    @property
    def block_size(self) -> int:
        return self.spec.block

    @property
    def nbytes(self) -> int:
        return self.qs.numel() + 2 * self.scales.numel()

    @property
    def device(self) -> torch.device:
        return self.qs.device

    def __repr__(self) -> str:
        return (f"QuantizedWeight(fmt={self.fmt!r}, shape={self.shape}, "
                f"nbytes={self.nbytes}, device={self.device})")

    def to(self, device) -> "QuantizedWeight":
        return QuantizedWeight(self.fmt, self.shape, self.qs.to(device), self.scales.to(device))

    # ------------------------------------------------------------------ values
    def codes(self) -> Tensor:
        """The integer quants [N, K/block, block] in weight order (int8 for q8_0, else uint8)."""
        return _quants(self.spec, block_order(self.qs, self.spec.quant_bytes))

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return dequantize_rows(self.fmt, self.qs, self.scales, self.shape[1]).to(dtype)

    # ------------------------------------------------------------------ GGUF bytes
    def gguf_blocks(self) -> Tensor:
        """uint8 [N, K/block * block_bytes]: the GGUF blocks ([fp16 d][quants] each)."""
        n, k = self.shape
        nb = k // self.spec.block
        d = self.scales.reshape(n, nb, 1).view(torch.uint8)
        return torch.cat([d, block_order(self.qs, self.spec.quant_bytes)], -1).reshape(n, -1)

    @classmethod
    def from_gguf_blocks(cls, raw: Tensor, fmt: str, shape: tuple[int, int]) -> "QuantizedWeight":
        spec = format_spec(fmt)
        n, k = shape
        if k % spec.block:
            raise ValueError(f"from_gguf_blocks: K={k} is not a multiple of {spec.block} ({fmt})")
        nb = k // spec.block
        want = n * nb * spec.block_bytes
        if raw.dtype != torch.uint8 or raw.numel() != want:
            raise ValueError(f"from_gguf_blocks: {fmt} {tuple(shape)} needs {want} uint8 bytes, "
                             f"got {raw.numel()} {raw.dtype}")
        blocks = raw.reshape(n, nb, spec.block_bytes)
        scales = blocks[..., :2].contiguous().view(torch.float16).reshape(n, nb)
        return cls(fmt, shape, interleave_groups(blocks[..., 2:]), scales.contiguous())

    # ------------------------------------------------------------------ files
    def state_dict(self, prefix: str = "") -> dict[str, Tensor]:
        return {prefix + "qs": self.qs, prefix + "scales": self.scales}

    def metadata(self) -> dict[str, str]:
        return {"fmt": self.fmt, "shape": json.dumps(list(self.shape))}

    @classmethod
    def from_state_dict(cls, tensors: dict[str, Tensor], metadata: dict[str, str],
                        prefix: str = "", where: str = "state dict") -> "QuantizedWeight":
        try:
            fmt = metadata["fmt"]
            shape = tuple(json.loads(metadata["shape"]))
            qs, scales = tensors[prefix + "qs"], tensors[prefix + "scales"]
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{where}: not a pyengine quantized weight (missing or bad {e})") from e
        if len(shape) != 2:
            raise ValueError(f"{where}: shape metadata must have 2 entries, got {shape}")
        return cls(fmt, shape, qs, scales)

    def save(self, path: str | os.PathLike) -> None:
        from safetensors.torch import save_file
        save_file({k: v.contiguous().cpu() for k, v in self.state_dict().items()}, str(path),
                  metadata=self.metadata())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "QuantizedWeight":
        from safetensors import safe_open
        path = str(path)
        try:
            with safe_open(path, framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except FileNotFoundError:
            raise
        except Exception as e:  # safetensors raises its own error type on truncation/garbage
            raise ValueError(f"{path}: not a readable safetensors file ({e})") from e
        try:
            return cls.from_state_dict(tensors, meta, where=path)
        except ValueError as e:
            msg = str(e)
            raise ValueError(msg if msg.startswith(path) else f"{path}: {msg}") from e


GROUP = 16  # blocks interleaved together (one SIMD lane each)
WORD = 4    # bytes per lane and step (one vpdpbusd input)


def _group_split(nb: int) -> list[tuple[int, int]]:
    """(first block, block count) of the interleaved groups of a row of nb blocks."""
    full = nb // GROUP * GROUP
    parts = [(0, full)] if full else []
    return parts + ([(full, nb - full)] if nb > full else [])


def interleave_groups(blocks: Tensor) -> Tensor:
    """uint8 [n, nb, qbytes] in block order -> the kernel layout [n, nb * qbytes]."""
    n, nb, qb = blocks.shape
    out = []
    for b0, cnt in _group_split(nb):
        g = GROUP if cnt % GROUP == 0 else cnt
        part = blocks[:, b0:b0 + cnt].reshape(n, cnt // g, g, qb // WORD, WORD)
        out.append(part.transpose(2, 3).reshape(n, -1))
    return torch.cat(out, 1).contiguous()


def block_order(qs: Tensor, qbytes: int) -> Tensor:
    """Inverse of interleave_groups: [n, nb * qbytes] -> [n, nb, qbytes]."""
    n = qs.shape[0]
    nb = qs.shape[1] // qbytes
    out = []
    for b0, cnt in _group_split(nb):
        g = GROUP if cnt % GROUP == 0 else cnt
        part = qs[:, b0 * qbytes:(b0 + cnt) * qbytes].reshape(n, cnt // g, qbytes // WORD, g, WORD)
        out.append(part.transpose(2, 3).reshape(n, cnt, qbytes))
    return torch.cat(out, 1)


def dequantize_rows(fmt: str, qs: Tensor, scales: Tensor, k: int) -> Tensor:
    """fp32 [n, k] from the two planes of n rows (plain torch ops: traceable, any device)."""
    spec = format_spec(fmt)
    n = qs.shape[0]
    nb = k // spec.block
    q = _quants(spec, block_order(qs, spec.quant_bytes))
    d = scales.reshape(n, nb, 1).float()
    if spec.codebook is not None:
        w = torch.tensor(spec.codebook, dtype=torch.float32, device=qs.device)[q.long()]
    else:
        w = q.float() - spec.zero
    return (w * d).reshape(n, k)


# ---------------------------------------------------------------------- models
def quantize_model(model: torch.nn.Module, fmt: str, skip: tuple[str, ...] = ("lm_head",),
                   backend: str | None = None) -> torch.nn.Module:
    """Replace every nn.Linear (in place) by a QuantLinear holding its quantized weight.
    Skipped: modules whose qualified name contains one of `skip`, and layers whose
    in_features is not a multiple of the format's block size (logged).  Returns model."""
    from pyengine.nn.quant import QuantLinear
    spec = format_spec(fmt)
    targets = []
    for name, mod in model.named_modules():
        if type(mod) is not torch.nn.Linear or any(s in name for s in skip):
            continue
        if mod.in_features % spec.block:
            log.warning("quantize_model: keeping %s unquantized (in_features %d not a multiple "
                        "of %d for %s)", name, mod.in_features, spec.block, fmt)
            continue
        targets.append(name)
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, QuantLinear.from_linear(getattr(parent, child), fmt, backend=backend))
    return model
