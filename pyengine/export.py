"""Export a Llama-family Hugging Face directory to GGUF (llama.cpp's file format).

    to_gguf("path/to/hf_dir", "model.gguf", "q8_0")     # fmt: f32 | f16 | bf16 | q8_0 | q4_0
    python -m pyengine.export HF_DIR OUT.gguf [--fmt q8_0] [--adapter DIR] [--force]

An existing output file is replaced only with --force (overwrite=True); the file is written
under a temporary name and renamed when complete. CLI errors: `error: ...`, exit 2.

Written with the `gguf` package's GGUFWriter, following llama.cpp's conventions for HF
Llama checkpoints: architecture "llama", tensors token_embd / blk.N.attn_q ... / output,
q and k rows permuted per head into llama.cpp's rope layout (the same permutation our
decoder uses, pyengine.infer.model.interleave_rope_rows), llama3 rope scaling as a
rope_freqs tensor, a byte-level BPE tokenizer as tokenizer.ggml.model "gpt2" with its
tokens, types and merges.  Qwen2 checkpoints: architecture "qwen2", q and k rows as HF
stores them (llama.cpp rotates halves for it) and the q / k / v biases.  2-D weights are
stored in `fmt`: F16 / BF16 (rounded to nearest even), or the exact GGUF blocks of
pyengine.quant (so llama.cpp and pyengine run identical weights); norms, and weights whose
rows are not a multiple of the block (warned), stay F32.  An optional PEFT adapter is merged
in fp32 (pyengine.lora.read_adapter; DoRA and other variants are refused).  Names come from
pyengine.infer.weights' table (the one the loader uses); the checkpoint is read one tensor at
a time and each tensor is written as soon as it is converted, so memory holds one tensor.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import tempfile
from pathlib import Path

import torch

from pyengine.infer.model import DecoderConfig, open_checkpoint, rope_inv_freq
from pyengine.infer.weights import (GLOBAL_WEIGHTS, ModelLoadError, WeightName,
                                    interleave_rope_rows, rope_heads, weight_names)

log = logging.getLogger("pyengine")


class ExportError(ValueError):
    """A GGUF export that cannot be done as asked (format, output path)."""


GGUF_FORMATS = ("f32", "f16", "bf16", "q8_0", "q4_0")
GGUF_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}  # HF model_type -> GGUF
# pre-tokenizer names llama.cpp knows, recognised from tokenizer.json's pre_tokenizer
LLAMA3_SPLIT = "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}"


def _pre_tokenizer_name(pre: dict | None) -> str:
    """llama.cpp's tokenizer.ggml.pre for a byte-level BPE pre_tokenizer spec."""
    if pre is None:
        return "default"
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    if pre.get("type") == "Sequence":
        parts = pre.get("pretokenizers", [])
        kinds = [p.get("type") for p in parts]
        if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits"):
            return "smollm"
        if kinds and kinds[0] == "Split" and parts[0].get("pattern", {}).get("Regex", "").startswith(LLAMA3_SPLIT):
            return "llama-bpe"
    log.warning("GGUF export: pre-tokenizer %s not recognised; writing 'default'", pre)
    return "default"


def _add_tokenizer(writer, model_dir: Path, vocab_size: int) -> None:
    import gguf
    from transformers import AutoTokenizer

    spec_path = model_dir / "tokenizer.json"
    if not spec_path.is_file():
        raise ModelLoadError(f"{model_dir}: tokenizer.json not found (GGUF export needs the "
                             "fast tokenizer file)")
    spec = json.loads(spec_path.read_text())
    model = spec.get("model", {})
    if model.get("type") != "BPE" or "ByteLevel" not in json.dumps(spec.get("pre_tokenizer")):
        raise ModelLoadError(f"{spec_path}: only byte-level BPE tokenizers are exported "
                             f"(found model type {model.get('type')})")
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    if len(by_id) > vocab_size:
        raise ModelLoadError(f"tokenizer has {len(by_id)} tokens, the model only {vocab_size}")
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer_name(spec.get("pre_tokenizer")))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=vocab_size).add_to_gguf(writer)


def _gguf_type(name: str, shape: tuple[int, ...], fmt: str):
    """The GGML type a weight is stored in: 1-D tensors, fmt f32 and weights whose row length
    is not a multiple of the format's block stay F32 (with a warning naming them, as
    pyengine.infer and finetune's quantize_base do)."""
    import gguf
    from pyengine.quant import format_spec

    T = gguf.GGMLQuantizationType
    if len(shape) == 1 or fmt == "f32":
        return T.F32
    if fmt in ("f16", "bf16"):
        return T[fmt.upper()]
    block = format_spec(fmt).block
    if shape[1] % block:
        log.warning("GGUF export: %s kept in F32: its rows (%d) are not a multiple of the %s "
                    "block (%d)", name, shape[1], fmt, block)
        return T.F32
    return T[fmt.upper()]


def _tensor_data(weight: torch.Tensor, ggml_type):
    """The bytes (numpy array) of `weight` as `ggml_type`: F16 / BF16 rounded to nearest
    even, Q8_0 / Q4_0 pyengine.quant's exact GGUF blocks."""
    from pyengine.quant import quantize

    weight = weight.float().contiguous()
    name = ggml_type.name
    if name == "F32":
        return weight.numpy()
    if name == "F16":
        return weight.half().numpy()
    if name == "BF16":  # numpy has no bf16: its bytes
        return weight.bfloat16().view(torch.uint8).numpy()
    return quantize(weight, name.lower()).gguf_blocks().numpy()


def _gguf_tensors(cfg: DecoderConfig, ckpt, arch: str):
    """(gguf name, shape, read) of every tensor in file order, read() giving the weight in
    llama.cpp's orientation (pyengine.infer.weights' table).  Arch "llama" rotates adjacent
    pairs, so its q / k rows are interleaved; "qwen2" rotates halves as HF does (rows kept)
    and has q / k / v biases."""
    def read(w: WeightName):
        heads = rope_heads(w, cfg.n_heads, cfg.n_kv_heads) if arch == "llama" else None
        return lambda: ckpt[w.hf] if heads is None else interleave_rope_rows(ckpt[w.hf], heads)

    def present(rows):
        for w in rows:
            if w.hf not in ckpt:
                if not w.optional:
                    raise ModelLoadError(f"weight '{w.hf}' missing from the checkpoint")
            elif not (w.hf == "lm_head.weight" and cfg.tied_embeddings):
                yield w.gguf, ckpt.shapes[w.hf], read(w)

    rows = weight_names(cfg.n_layers)
    yield from present(rows[:len(GLOBAL_WEIGHTS)])
    if cfg.rope_scaling is not None and cfg.rope_scaling.get("rope_type") == "llama3":
        plain = rope_inv_freq(DecoderConfig(**{**cfg.__dict__, "rope_scaling": None}))
        freqs = (plain / rope_inv_freq(cfg)).float()
        yield "rope_freqs.weight", tuple(freqs.shape), lambda: freqs
    yield from present(rows[len(GLOBAL_WEIGHTS):])


def _check_output(path: Path, overwrite: bool, inputs: tuple[Path, ...] = ()) -> None:
    for given in inputs:
        if given.resolve() in path.resolve().parents:
            raise ExportError(f"output {path} is inside the input directory {given}; "
                              "write the GGUF file elsewhere")
    if path.is_dir():
        raise ExportError(f"output {path} is a directory; give a file path such as {path / 'model.gguf'}")
    if path.exists() and not overwrite:
        raise ExportError(f"output {path} already exists (pass --force / overwrite=True to replace it)")


def to_gguf(model_dir, path, fmt: str = "q8_0", *, adapter=None, overwrite: bool = False) -> Path:
    """Write `model_dir` (HF Llama / Mistral / Qwen2) as a GGUF file at `path` with 2-D weights in
    `fmt` (f32 | f16 | bf16 | q8_0 | q4_0). Returns the path.

    An existing file at `path` is replaced only with overwrite=True. The file is written
    under a temporary name in the same directory and renamed when complete, so a failed
    or interrupted export leaves no partial .gguf."""
    import gguf

    if fmt not in GGUF_FORMATS:
        raise ExportError(f"fmt must be one of {', '.join(GGUF_FORMATS)}, got '{fmt}'")
    model_dir, path = Path(model_dir), Path(path)
    inputs = (model_dir,) if adapter is None else (model_dir, Path(adapter))
    _check_output(path, overwrite, inputs)
    cfg, ckpt = open_checkpoint(model_dir, adapter)
    if cfg.model_type not in GGUF_ARCH:
        raise ModelLoadError(f"GGUF export supports {', '.join(GGUF_ARCH)}, not "
                             f"'{cfg.model_type}'")
    arch = GGUF_ARCH[cfg.model_type]
    allowed = ("q_proj.bias", "k_proj.bias", "v_proj.bias") if arch == "qwen2" else ()
    extra = [k for k in ckpt if k.endswith("_proj.bias") and not k.endswith(allowed)]
    if extra:
        raise ModelLoadError(f"GGUF export: projection biases are not supported for {arch} "
                             f"(e.g. {extra[0]})")
    writer = gguf.GGUFWriter(None, arch)
    writer.add_name(model_dir.name)
    writer.add_context_length(cfg.max_positions)
    writer.add_embedding_length(cfg.hidden)
    writer.add_block_count(cfg.n_layers)
    writer.add_feed_forward_length(cfg.intermediate)
    writer.add_head_count(cfg.n_heads)
    writer.add_head_count_kv(cfg.n_kv_heads)
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_rope_freq_base(cfg.rope_theta)
    if cfg.rope_scaling is not None and cfg.rope_scaling.get("rope_type") == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(cfg.rope_scaling["factor"]))
    writer.add_layer_norm_rms_eps(cfg.rms_eps)
    writer.add_vocab_size(cfg.vocab)
    writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                          "bf16": gguf.LlamaFileType.MOSTLY_BF16,
                          "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
                          "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[fmt])
    _add_tokenizer(writer, model_dir, cfg.vocab)
    import numpy as np

    tensors = []  # header first (shapes and types), then each tensor read, converted, written
    for name, shape, read in _gguf_tensors(cfg, ckpt, arch):
        ggml_type = _gguf_type(name, shape, fmt)
        byte_shape = gguf.quants.quant_shape_to_byte_shape(shape, ggml_type)
        writer.add_tensor_info(name, byte_shape, np.uint8, math.prod(byte_shape),
                               raw_dtype=ggml_type)
        tensors.append((read, ggml_type))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        writer.write_header_to_file(Path(tmp))
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for read, ggml_type in tensors:
            writer.write_tensor_data(_tensor_data(read(), ggml_type))
        writer.close()
        _check_output(path, overwrite)  # a file that appeared meanwhile is not replaced either
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would hide the file from other users
        os.replace(tmp, path)
    finally:
        writer.close()
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pyengine.export",
                                 description="Write a Llama-family HF directory as GGUF.",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("model_dir", help="Hugging Face model directory (Llama / Mistral)")
    ap.add_argument("path", help="output .gguf file (written complete or not at all)")
    ap.add_argument("--fmt", choices=GGUF_FORMATS, default="q8_0",
                    help="format of the 2-D weights (norms stay F32)")
    ap.add_argument("--adapter", help="PEFT LoRA adapter directory, merged in fp32 first")
    ap.add_argument("--force", action="store_true", help="replace an existing output file")
    a = ap.parse_args(argv)
    try:
        print(to_gguf(a.model_dir, a.path, a.fmt, adapter=a.adapter, overwrite=a.force))
    except KeyboardInterrupt:
        print("interrupted: no file written", file=sys.stderr)
        return 130
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
