"""The quantization format table: the one definition every layer reads.

Python (pyengine.quant, pyengine.ops.quant, the Triton kernel) imports FORMATS; the C++
build runs this file (`python pyengine/quant_formats.py OUT.h`, from CMakeLists.txt) to
write the header csrc/quant.h includes, so the C++ templates get the same numbers as
compile-time constants and a stale extension is caught by pyengine._C.quant_formats()
(tests/test_quant.py compares it with this table).  Torch-free and import-free on purpose:
the build runs it by path, before the package is importable.

A quant q of a block with scale d means the weight d * value(q), where value(q) is
  codebook[q]        if the format has a codebook (nf4),
  q                  if the quants are signed two's-complement integers (q8_0),
  q - zero           otherwise (q4_0: unsigned nibbles, zero 8).
"""
from __future__ import annotations

import struct
import sys
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class FormatSpec:
    code: int             # the format's number in pyengine._C's `fmt` arguments
    block: int            # weights per block
    bits: int             # bits per quant
    signed: bool = False  # quants are two's-complement integers
    zero: int = 0         # subtracted from an unsigned quant
    codebook: tuple[float, ...] | None = None  # quant -> value table (fp32 values)
    scale_bytes: int = 2  # fp16 scale per block

    @property
    def quant_bytes(self) -> int:  # quant bytes per block
        return self.block * self.bits // 8

    @property
    def block_bytes(self) -> int:  # GGUF bytes per block
        return self.scale_bytes + self.quant_bytes


# QLoRA's NormalFloat4 code values (Dettmers et al. 2023, Appendix E), ascending.
NF4_CODEBOOK = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
                -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
                0.07958029955625534, 0.16093020141124725, 0.24611230194568634,
                0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                0.7229568362236023, 1.0)

FORMATS = {
    "q8_0": FormatSpec(code=0, block=32, bits=8, signed=True),
    "q4_0": FormatSpec(code=1, block=32, bits=4, zero=8),
    "nf4": FormatSpec(code=2, block=64, bits=4, codebook=NF4_CODEBOOK),
}


def _f32_literal(v: float) -> str:
    """v as an exact C++ float literal (hex); v must be an fp32 value."""
    if struct.unpack("<f", struct.pack("<f", v))[0] != v:
        raise ValueError(f"codebook value {v!r} is not an fp32 number")
    return f"{v.hex()}f"


def cpp_header() -> str:
    """The C++ rendering of FORMATS: enum QuantFmt and the constexpr table kQuantFormats."""
    specs = sorted(FORMATS.items(), key=lambda kv: kv[1].code)
    if [s.code for _, s in specs] != list(range(len(specs))):
        raise ValueError("format codes must be 0, 1, ... (they index the C++ table)")
    enum = ", ".join(f"k{name.upper()} = {s.code}" for name, s in specs)
    books, rows = [], []
    for name, s in specs:
        book = "nullptr"
        if s.codebook is not None:
            book = f"kCodebook_{name}"
            vals = ", ".join(_f32_literal(v) for v in s.codebook)
            books.append(f"constexpr float {book}[{len(s.codebook)}] = {{{vals}}};")
        rows.append(f'    {{"{name}", {s.block}, {s.bits}, {str(s.signed).lower()}, {s.zero}, '
                    f'{book}, {len(s.codebook or ())}}},')
    return "\n".join([
        "// Generated from pyengine/quant_formats.py by the build; do not edit.",
        "#pragma once",
        "",
        "namespace pyengine {",
        "",
        f"enum QuantFmt : int {{ {enum} }};",
        f"constexpr int kNumQuantFmts = {len(specs)};",
        "",
        "// One format (see pyengine/quant_formats.py): weight = d * value(q).",
        "struct QuantFormat {",
        "  const char* name;",
        "  int block, bits;",
        "  bool is_signed;         // q is two's complement: value = q",
        "  int zero;               // unsigned q: value = q - zero",
        "  const float* codebook;  // if set: value = codebook[q]",
        "  int codebook_size;",
        "};",
        "",
        *books,
        "constexpr QuantFormat kQuantFormats[kNumQuantFmts] = {",
        *rows,
        "};",
        "",
        "}  // namespace pyengine",
        "",
    ])


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(f"usage: {argv[0]} OUT.h", file=sys.stderr)
        return 2
    out, text = Path(argv[1]), cpp_header()
    if not out.exists() or out.read_text() != text:  # unchanged: keep the mtime, no rebuild
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
