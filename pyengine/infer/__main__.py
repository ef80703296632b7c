"""python -m pyengine.infer --model DIR [--adapter DIR] [--quant q4_0|q8_0|nf4|none]
    (--prompt TEXT | --prompt-file F) [--max-new-tokens N] [--temperature F] [--top-p F]
    [--seed N] [--chat] [--dtype fp32|bf16]

Streams the generated text to stdout; prefill / decode speed goes to stderr.
Errors print `error: ...` and exit 2; Ctrl-C exits 130; a closed stdout (`... | head`)
ends the run quietly with exit 141, as a process stopped by SIGPIPE. The command runs with
OMP_WAIT_POLICY=PASSIVE unless the user set a policy (pyengine.cli.passive_openmp);
programs it starts do not inherit that setting."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from pyengine.cli import passive_openmp, positive_int
from pyengine.infer import QUANT_FORMATS, ModelLoadError, generate, load_model, load_tokenizer


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pyengine.infer",
                                description="Generate text with a Llama-family HF model.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True, help="Hugging Face model directory")
    p.add_argument("--adapter", help="PEFT LoRA adapter directory, merged before quantization")
    p.add_argument("--quant", choices=QUANT_FORMATS, default="none",
                   help="weight format of the linear layers")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                   help="weight/activation dtype when --quant none")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text")
    src.add_argument("--prompt-file", type=Path, help="file holding the prompt text")
    p.add_argument("--max-new-tokens", type=positive_int, default=128,
                   help="tokens to generate at most (prompt + these must fit the model's context)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    p.add_argument("--seed", type=int, help="sampling seed (random when not given)")
    p.add_argument("--chat", action="store_true", help="apply the tokenizer's chat template")
    p.add_argument("--threads", type=positive_int, default=torch.get_num_threads(),
                   help="threads for torch and pyengine's kernels (default: torch's count)")
    args = p.parse_args(argv)
    if args.temperature < 0:
        p.error(f"--temperature must be >= 0, got {args.temperature}")
    if not 0 < args.top_p <= 1:
        p.error(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.prompt_file is not None:
        if not args.prompt_file.is_file():
            p.error(f"--prompt-file {args.prompt_file} does not exist")
        try:
            args.prompt = args.prompt_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            p.error(f"--prompt-file {args.prompt_file}: cannot read it as UTF-8 text ({e})")
    if args.dtype == "bf16" and args.quant != "none":
        p.error("--dtype bf16 applies to --quant none only (quantized layers run fp32 activations)")
    return args


def _run(args) -> int:
    try:
        model = load_model(args.model, adapter=args.adapter, quant=args.quant,
                           dtype=torch.bfloat16 if args.dtype == "bf16" else torch.float32)
        tokenizer = load_tokenizer(args.model)
        generate(model, tokenizer, args.prompt, max_new_tokens=args.max_new_tokens,
                 temperature=args.temperature, top_p=args.top_p, seed=args.seed, stream=True,
                 chat=args.chat, report=lambda s: print(f"\n[{s}]", file=sys.stderr))
    except (ModelLoadError, ValueError, OSError) as e:
        if isinstance(e, BrokenPipeError):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    sys.stdout.write("\n")
    sys.stdout.flush()
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)  # pyengine's kernels read torch's count
    try:
        return _run(args)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader went away: send the rest of our output nowhere so the interpreter's
        # final flush does not fail again, and stop quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    passive_openmp()
    sys.exit(main())
