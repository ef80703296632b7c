"""Decode speed (one stream, greedy) of a Llama-architecture model with random weights:
pyengine.infer at fp32 / bf16 / q8_0 / q4_0 vs transformers `generate` and vs llama.cpp
(llama-cpp-python, the same weights exported with pyengine.export.to_gguf), same thread
count, prompt and length, measured side by side in one process.

    python benchmarks/bench_infer.py --shape 135m [--shape 1b] [--engines ...]   # table
    pytest benchmarks/bench_infer.py                                            # 135m gates

Shapes: 135m = SmolLM-135M (30 layers, H=576, I=1536, 9 heads / 3 kv, V=49152, tied);
1b = 16 layers, H=2048, I=8192, 32 heads / 8 kv, V=49152, tied.
Floor per decoded token: the weight bytes (fp32 4 B, bf16 2 B, q8_0 1.0625 B, q4_0
0.5625 B per weight, LM head included) at the ~35 GB/s copy bandwidth.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

# Idle OpenMP threads must sleep, not spin: spinning torch threads take the cores from
# pyengine's own kernel thread pool between ops (measured: 3 -> 23-73 tokens/s at 135m).
# Read by the OpenMP runtime when it loads, so before torch (same setting for every engine).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

SHAPES = {
    "135m": dict(num_hidden_layers=30, hidden_size=576, intermediate_size=1536,
                 num_attention_heads=9, num_key_value_heads=3, vocab_size=49152),
    "1b": dict(num_hidden_layers=16, hidden_size=2048, intermediate_size=8192,
               num_attention_heads=32, num_key_value_heads=8, vocab_size=49152),
}
THREADS = 2
PROMPT_TOKENS, NEW_TOKENS, REPEATS = 32, 64, 3
CACHE = Path("/tmp/pyengine_bench_infer")
BYTES_PER_WEIGHT = {"fp32": 4.0, "bf16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32}


def model_dir(shape: str) -> Path:
    """A random-init HF Llama directory at `shape` (built once, cached on disk)."""
    import transformers
    from tiny_llama import save_tiny_tokenizer

    path = CACHE / shape
    if (path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file():
        return path
    path.mkdir(parents=True, exist_ok=True)
    save_tiny_tokenizer(path)
    cfg = transformers.LlamaConfig(**SHAPES[shape], tie_word_embeddings=True,
                                   max_position_embeddings=2048, rope_theta=10000.0,
                                   bos_token_id=0, eos_token_id=1)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    if shape == "1b":  # bf16 on disk halves the file; weights are the same for every engine
        model = model.to(torch.bfloat16)
    model.save_pretrained(path)
    return path


def gguf_file(shape: str, fmt: str) -> Path:
    from pyengine.export import to_gguf

    path = CACHE / f"{shape}-{fmt}.gguf"
    if not path.is_file():
        to_gguf(model_dir(shape), path, fmt)
    return path


def prompt_ids(vocab: int) -> list[int]:
    g = torch.Generator().manual_seed(1)
    return torch.randint(2, vocab, (PROMPT_TOKENS,), generator=g).tolist()


def decode_ours(shape: str, variant: str) -> float:
    """Median decode tokens/s of pyengine.infer (variant: fp32 | bf16 | q8_0 | q4_0)."""
    from pyengine.infer import generate_ids, load_model

    quant = variant if variant.startswith("q") else "none"
    dtype = torch.bfloat16 if variant == "bf16" else torch.float32
    model = load_model(model_dir(shape), quant=quant, dtype=dtype)
    ids = prompt_ids(model.cfg.vocab)
    generate_ids(model, ids, max_new_tokens=8)  # warm-up
    rates = [generate_ids(model, ids, max_new_tokens=NEW_TOKENS)[1].decode_tokens_per_s
             for _ in range(REPEATS)]
    return statistics.median(rates)


def decode_transformers(shape: str, variant: str) -> float:
    """Median decode tokens/s of transformers `generate` (greedy): (N-1) / (t(N) - t(1))."""
    import transformers

    dtype = torch.bfloat16 if variant == "bf16" else torch.float32
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir(shape), dtype=dtype).eval()
    ids = torch.tensor([prompt_ids(model.config.vocab_size)])

    def run(n):
        t = time.perf_counter()
        model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                       pad_token_id=0)
        return time.perf_counter() - t

    run(4)
    rates = [(NEW_TOKENS - 1) / (run(NEW_TOKENS) - run(1)) for _ in range(REPEATS)]
    return statistics.median(rates)


def decode_llama_cpp(shape: str, variant: str) -> float | None:
    """Median decode tokens/s of llama.cpp on the same weights (None if not installed)."""
    try:
        import llama_cpp
    except ImportError:
        return None
    fmt = {"fp32": "f32"}.get(variant, variant)
    llm = llama_cpp.Llama(model_path=str(gguf_file(shape, fmt)), n_threads=THREADS,
                          n_threads_batch=THREADS, n_ctx=PROMPT_TOKENS + NEW_TOKENS + 8,
                          verbose=False)
    ids = prompt_ids(SHAPES[shape]["vocab_size"])

    def run():
        n, t_first = 0, None
        for _ in llm.generate(ids, temp=0.0, top_k=1, reset=True):
            n += 1
            if n == 1:
                t_first = time.perf_counter()
            if n == NEW_TOKENS:
                break
        return (NEW_TOKENS - 1) / (time.perf_counter() - t_first)

    run()
    return statistics.median(run() for _ in range(REPEATS))


ENGINES = {"pyengine": decode_ours, "transformers": decode_transformers, "llama.cpp": decode_llama_cpp}
VARIANTS = {"135m": {"pyengine": ("fp32", "bf16", "q8_0", "q4_0"),
                     "transformers": ("fp32", "bf16"),
                     "llama.cpp": ("fp32", "q8_0", "q4_0")},
            # 1b: heavy on a shared machine, so only the rows the targets need
            "1b": {"pyengine": ("fp32", "q8_0", "q4_0"), "llama.cpp": ("q8_0", "q4_0")}}


def weight_bytes(shape: str, variant: str) -> float:
    s = SHAPES[shape]
    h, i, layers, v = s["hidden_size"], s["intermediate_size"], s["num_hidden_layers"], s["vocab_size"]
    kv = h * s["num_key_value_heads"] // s["num_attention_heads"]
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * i
    return (layers * per_layer + v * h) * BYTES_PER_WEIGHT[variant]


def table(shapes, engines) -> str:
    torch.set_num_threads(THREADS)
    rows = ["| shape | engine | weights | decode tokens/s | GB/s of weights read | x our fp32 |",
            "|---|---|---|---|---|---|"]
    for shape in shapes:
        ours_fp32 = None
        for engine in engines:
            for variant in VARIANTS[shape].get(engine, ()):
                rate = ENGINES[engine](shape, variant)
                if rate is None:
                    rows.append(f"| {shape} | {engine} | {variant} | not installed | | |")
                    continue
                if engine == "pyengine" and variant == "fp32":
                    ours_fp32 = rate
                ratio = f"{rate / ours_fp32:.2f}" if ours_fp32 else ""
                gbs = rate * weight_bytes(shape, variant) / 1e9
                rows.append(f"| {shape} | {engine} | {variant} | {rate:.1f} | {gbs:.1f} | {ratio} |")
                print(rows[-1], flush=True)
    return "\n".join(rows)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", action="append", choices=tuple(SHAPES))
    ap.add_argument("--engines", nargs="+", choices=tuple(ENGINES), default=list(ENGINES))
    a = ap.parse_args()
    print(table(a.shape or ["135m"], a.engines))


# ------------------------------------------------------------------ pytest-benchmark entry
def test_decode_135m_gates(benchmark):
    """135m: q8_0 and q4_0 decode >= 3x our fp32 and >= llama.cpp's on the same weights,
    measured in this run. The timed body is one 64-token pyengine q4_0 generation."""
    from pyengine.infer import generate_ids, load_model

    torch.set_num_threads(THREADS)
    rates = {v: decode_ours("135m", v) for v in ("fp32", "q8_0", "q4_0")}
    theirs = {v: decode_llama_cpp("135m", v) for v in ("q8_0", "q4_0")}
    model = load_model(model_dir("135m"), quant="q4_0")
    ids = prompt_ids(model.cfg.vocab)
    benchmark.pedantic(generate_ids, args=(model, ids), kwargs=dict(max_new_tokens=NEW_TOKENS),
                       rounds=REPEATS, warmup_rounds=1)
    benchmark.extra_info.update({f"pyengine_{k}": v for k, v in rates.items()})
    benchmark.extra_info.update({f"llama_cpp_{k}": v for k, v in theirs.items()})
    for v in ("q8_0", "q4_0"):
        assert rates[v] >= 3 * rates["fp32"], (v, rates)
        if theirs[v] is not None:
            assert rates[v] >= theirs[v], (v, rates[v], theirs[v])
