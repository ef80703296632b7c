"""python -m pyengine.serve --model DIR [--quant q4_0|q8_0|nf4|none] [--dtype fp32|bf16]
    [--adapter NAME=DIR ...] [--served-name NAME] [--host 127.0.0.1] [--port 8000]
    [--max-batch 8] [--max-len N] [--max-queue 64] [--prefill-chunk 128]
    [--api-key KEY] [--threads N]

An OpenAI-compatible HTTP server (pyengine.serve.app) over continuous batching
(pyengine.serve.scheduler). Errors before serving print `error: ...` and exit 2; Ctrl-C or
SIGTERM stop it gracefully (uvicorn). Runs with OMP_WAIT_POLICY=PASSIVE unless the user
set a policy (pyengine.cli.passive_openmp)."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from pyengine.cli import passive_openmp, positive_int
from pyengine.infer import QUANT_FORMATS, ModelLoadError, load_model, load_tokenizer


def _adapter(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=DIR, got '{text}'")
    if "/" in name or any(c.isspace() for c in name):
        raise argparse.ArgumentTypeError(f"NAME '{name}' may hold no '/' and no spaces")
    return name, path


def _port(text: str) -> int:
    port = int(text)
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"must be in [0, 65535] (0: any free port), got {port}")
    return port


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pyengine.serve",
                                description="Serve a Llama-family HF model (and LoRA adapters) "
                                            "over an OpenAI-compatible HTTP API.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True, help="Hugging Face model directory")
    p.add_argument("--quant", choices=QUANT_FORMATS, default="none",
                   help="weight format of the linear layers")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                   help="weight/activation dtype when --quant none")
    p.add_argument("--adapter", type=_adapter, action="append", default=[], metavar="NAME=DIR",
                   help="a PEFT LoRA adapter served as model NAME (repeatable; not merged)")
    p.add_argument("--served-name", help="the base model's name in the API (default: the "
                                         "model directory's name)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind")
    p.add_argument("--port", type=_port, default=8000, help="port (0: any free port)")
    p.add_argument("--max-batch", type=positive_int, default=8,
                   help="sequences decoded together (KV-cache slots)")
    p.add_argument("--max-len", type=positive_int,
                   help="positions per sequence, prompt + completion (default: the model's "
                        "context, at most 2048)")
    p.add_argument("--max-queue", type=positive_int, default=64,
                   help="requests that may wait for a slot; more get HTTP 429")
    p.add_argument("--prefill-chunk", type=positive_int, default=128,
                   help="prompt tokens per engine step (a long prompt is prefilled in chunks "
                        "between the other sequences' decode steps: smaller = shorter stalls "
                        "for them; quantized models prefill ~2x faster per token once a step "
                        "has >= 96 prompt tokens, the AMX GEMM)")
    p.add_argument("--api-key", default=os.environ.get("PYENGINE_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on every route (default: "
                        "$PYENGINE_API_KEY; none: no check)")
    p.add_argument("--threads", type=positive_int, default=torch.get_num_threads(),
                   help="threads for torch and pyengine's kernels (default: torch's count)")
    p.add_argument("--log-level", default="info",
                   choices=("critical", "error", "warning", "info", "debug"))
    args = p.parse_args(argv)
    if args.dtype == "bf16" and args.quant != "none":
        p.error("--dtype bf16 applies to --quant none only (quantized layers run fp32 activations)")
    names = [name for name, _ in args.adapter]
    if len(set(names)) != len(names):
        p.error(f"--adapter: a NAME is given twice ({', '.join(names)})")
    return args


def build_app(args):
    """Load the model, tokenizer and adapters; the FastAPI app serving them."""
    from pyengine.infer.batch import BatchDecoder
    from pyengine.serve.app import create_app

    tokenizer = load_tokenizer(args.model)
    model = load_model(args.model, quant=args.quant, max_len=1,
                       dtype=torch.bfloat16 if args.dtype == "bf16" else torch.float32)
    context = model.cfg.max_positions
    max_len = args.max_len or min(context, 2048)
    if max_len > context:
        raise ValueError(f"--max-len {max_len} exceeds the model's context of {context} tokens "
                         "(max_position_embeddings)")
    name = args.served_name or Path(args.model).resolve().name
    if name in {n for n, _ in args.adapter}:
        raise ValueError(f"--adapter {name}: the base model is served as '{name}'; pick another "
                         "NAME (or --served-name)")
    engine = BatchDecoder(model, slots=args.max_batch, max_len=max_len,
                          max_rows=args.max_batch + args.prefill_chunk)
    for adapter, path in args.adapter:
        try:
            engine.add_adapter(adapter, path)
        except ModelLoadError as e:
            raise ModelLoadError(f"--adapter {adapter}={path}: {e}") from None
    stop_ids = set(model.cfg.eos_token_ids)
    if tokenizer.eos_token_id is not None:
        stop_ids.add(tokenizer.eos_token_id)
    return create_app(engine, tokenizer, model_name=name, max_len=max_len,
                      max_batch=args.max_batch, stop_ids=stop_ids,
                      prefill_chunk=args.prefill_chunk, max_queue=args.max_queue,
                      api_key=args.api_key)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        import fastapi, prometheus_client, uvicorn  # noqa: F401, E401 -- the serve extra
    except ImportError as e:
        print(f"error: the server needs the `serve` extra (pip install 'pyengine[serve]'): {e}",
              file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)  # pyengine's kernels read torch's count
    try:
        app = build_app(args)
    except (ModelLoadError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


if __name__ == "__main__":
    passive_openmp()
    sys.exit(main())
