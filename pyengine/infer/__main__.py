"""python -m pyengine.infer --model DIR [--adapter DIR] [--quant q4_0|q8_0|nf4|none]
    (--prompt TEXT | --prompt-file F) [--max-new-tokens N] [--temperature F] [--top-p F]
    [--seed N] [--chat] [--dtype fp32|bf16]

Streams the generated text to stdout; prefill / decode speed goes to stderr."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from pyengine.infer import QUANT_FORMATS, ModelLoadError, generate, load_model


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pyengine.infer",
                                description="Generate text with a Llama-family HF model.")
    p.add_argument("--model", required=True, help="Hugging Face model directory")
    p.add_argument("--adapter", help="PEFT LoRA adapter directory, merged before quantization")
    p.add_argument("--quant", choices=QUANT_FORMATS, default="none")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                   help="weight/activation dtype when --quant none")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt")
    src.add_argument("--prompt-file", type=Path)
    p.add_argument("--max-new-tokens", type=_positive_int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int)
    p.add_argument("--chat", action="store_true", help="apply the tokenizer's chat template")
    args = p.parse_args(argv)
    if args.temperature < 0:
        p.error(f"--temperature must be >= 0, got {args.temperature}")
    if not 0 < args.top_p <= 1:
        p.error(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.prompt_file is not None:
        if not args.prompt_file.is_file():
            p.error(f"--prompt-file {args.prompt_file} does not exist")
        args.prompt = args.prompt_file.read_text()
    if args.dtype == "bf16" and args.quant != "none":
        p.error("--dtype bf16 applies to --quant none only (quantized layers run fp32 activations)")
    return args


def _restart_with_passive_openmp() -> None:
    """Re-run this command with OMP_WAIT_POLICY=PASSIVE unless the user set a policy.

    Between the many small ops of a decode step, torch's idle OpenMP threads spin and take
    the cores from pyengine's kernel thread pool (decode measured 3-8x slower). The OpenMP
    runtime reads the policy only when it loads, which `import pyengine` has already done."""
    if "OMP_WAIT_POLICY" in os.environ:
        return
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    os.execv(sys.executable, [sys.executable, "-m", "pyengine.infer", *sys.argv[1:]])


def main(argv=None) -> int:
    if argv is None:
        _restart_with_passive_openmp()
    args = parse_args(argv)
    from transformers import AutoTokenizer

    try:
        model = load_model(args.model, adapter=args.adapter, quant=args.quant,
                           dtype=torch.bfloat16 if args.dtype == "bf16" else torch.float32)
    except (ModelLoadError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        tokenizer = AutoTokenizer.from_pretrained(args.model, local_files_only=True)
    except (OSError, ValueError) as e:
        print(f"error: cannot load a tokenizer from {args.model}: {e}", file=sys.stderr)
        return 2
    try:
        generate(model, tokenizer, args.prompt, max_new_tokens=args.max_new_tokens,
                 temperature=args.temperature, top_p=args.top_p, seed=args.seed, stream=True,
                 chat=args.chat, report=lambda s: print(f"\n[{s}]", file=sys.stderr))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
