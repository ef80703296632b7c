"""Inference speed, one stream, greedy: pyengine vs llama.cpp vs transformers, each engine in
its own process, measured the same way, rounds interleaved.

    python benchmarks/bench_infer.py --shape 135m --shape 1b --threads 1 2   # the table
    python benchmarks/bench_infer.py --quick          # harness check: 135m, 8 tokens, 1 round
    make bench-infer [LLAMA_NO_AMX=1]                 # the peer in .venv-llamacpp*, then the above
    pytest benchmarks/bench_infer.py                  # 135m gates + a tiny-shape harness test

Model: a Llama with random weights at a given shape, written once as an HF directory
(tests/tiny_llama's tokenizer; 135m stored fp32, 1b bf16):
  tiny = 2 layers, H 64, I 128, 4 heads / 2 kv, V 512 (harness tests only);
  135m = SmolLM-135M: 30 layers, H 576, I 1536, 9 heads / 3 kv, V 49152, tied head;
  1b   = 16 layers, H 2048, I 8192, 32 heads / 8 kv, V 49152, tied head.
Engines (weights are the same numbers for every engine):
  pyengine      the library API: torch.set_num_threads(T); pyengine.infer.load_model(dir,
                quant=q8_0 | q4_0 | none (fp32, 135m only)) and generate_ids(...), greedy;
  llama.cpp     llama-cpp-python's Llama(gguf, n_threads=T, n_threads_batch=T, other
                settings default) and its generate(ids, temp=0) (greedy sampler chain,
                its per-token Python included, as ours is), on the GGUF that
                pyengine.export.to_gguf writes from the same HF directory (q8_0, q4_0);
  transformers  AutoModelForCausalLM fp32 / bf16 (135m only), generate(do_sample=False,
                min_new_tokens=N) with torch.set_num_threads(T).
Every engine x weights x thread count is one long-lived worker process
(`python -m benchmarks.bench_infer --worker`), loaded once and driven over stdin/stdout in
JSON lines. Its environment holds only PATH, HOME, USER, LOGNAME, LANG, LC_ALL, LC_CTYPE,
TERM, TMPDIR and TZ, those the caller has set (so no OMP_*, PYENGINE_*, PYTHONPATH; the
worker imports this checkout's pyengine because it runs with -m from the checkout root).
The interpreter is given per engine: --python (pyengine, transformers), --llama-python.

Measurement, identical for every engine: the prompt is the same random token ids (no
tokenizer), greedy, exactly N new tokens. t0 is taken just before the call that starts
generation; every new token is timestamped when the engine hands it to the caller
(pyengine's on_token, llama-cpp-python's generator, a transformers streamer).
prefill tok/s = prompt tokens / (t(first token) - t0);
decode tok/s = (N - 1) / (t(token N) - t(first token)).
Nothing is cached between runs: llama.cpp's generate() would reuse a matching prompt prefix
from its KV cache, so the worker calls Llama.reset() after each run, and each run checks
llama.cpp's own counter (llama_perf_context n_p_eval) saw the whole prompt evaluated.
One warm-up round first (not counted). Round r runs every worker once per prompt, the
worker order rotated by r, so drift on a shared machine hits all engines alike. Reported:
per engine the median over rounds, and ours/peer as the median of the per-round ratios
(peer: llama.cpp with the same quantization; transformers fp32 for our fp32), plus how many
leading greedy ids ours shares with the peer.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {
    "tiny": dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=512),
    "135m": dict(num_hidden_layers=30, hidden_size=576, intermediate_size=1536,
                 num_attention_heads=9, num_key_value_heads=3, vocab_size=49152),
    "1b": dict(num_hidden_layers=16, hidden_size=2048, intermediate_size=8192,
               num_attention_heads=32, num_key_value_heads=8, vocab_size=49152),
}
PROMPTS = {"tiny": (16,), "135m": (100,), "1b": (128, 512)}  # prompt lengths in tokens
VARIANTS = {  # engine -> shape -> weights
    "pyengine": {"tiny": ("fp32", "q8_0", "q4_0"), "135m": ("fp32", "q8_0", "q4_0"),
                 "1b": ("q8_0", "q4_0")},
    "llama.cpp": {"tiny": ("q8_0", "q4_0"), "135m": ("q8_0", "q4_0"), "1b": ("q8_0", "q4_0")},
    "transformers": {"tiny": ("fp32", "bf16"), "135m": ("fp32", "bf16")},
}
PEERS = {"q8_0": ("llama.cpp", "q8_0"), "q4_0": ("llama.cpp", "q4_0"),
         "fp32": ("transformers", "fp32")}
PASSED_ENV = ("PATH", "HOME", "USER", "LOGNAME", "LANG", "LC_ALL", "LC_CTYPE", "TERM",
              "TMPDIR", "TZ")
NEW_TOKENS, ROUNDS, WARMUP_ROUNDS = 64, 5, 1
CACHE = Path("/tmp/pyengine_bench_infer")
LLAMA_VENVS = (".venv-llamacpp-noamx", ".venv-llamacpp")  # made by make bench-infer


def default_llama_python() -> str:
    """The first peer venv `make bench-infer` made (the no-AMX one is only built where the
    default one crashes), else this interpreter."""
    found = [p for p in (ROOT / v / "bin" / "python" for v in LLAMA_VENVS) if p.is_file()]
    return str(found[0]) if found else sys.executable


# ------------------------------------------------------------------ inputs (own process)
def prepare(shape: str, formats: list[str], cache: Path, save_tokenizer=None) -> dict:
    """The HF directory at `shape` (built once, complete or absent) and its GGUF files in
    `formats`, rewritten when older than the directory or than any pyengine source file.
    save_tokenizer(dir) writes the tokenizer (default: tests/tiny_llama's)."""
    import shutil

    import torch
    import transformers
    from pyengine.export import to_gguf

    if save_tokenizer is None:
        sys.path.insert(0, str(ROOT / "tests"))
        from tiny_llama import save_tiny_tokenizer as save_tokenizer

    model_dir = cache / shape
    if not model_dir.is_dir():
        partial = cache / f"{shape}.partial"  # ours: a build that was interrupted
        shutil.rmtree(partial, ignore_errors=True)
        save_tokenizer(partial)
        cfg = transformers.LlamaConfig(**SHAPES[shape], tie_word_embeddings=True,
                                       max_position_embeddings=2048, rope_theta=10000.0,
                                       bos_token_id=0, eos_token_id=1)
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(cfg)
        if shape == "1b":  # bf16 on disk halves the file; every engine reads the same numbers
            model = model.to(torch.bfloat16)
        model.save_pretrained(partial)
        partial.rename(model_dir)
    newest_input = max(p.stat().st_mtime for p in [model_dir, *(ROOT / "pyengine").rglob("*.py")])
    ggufs = {}
    for fmt in formats:
        path = cache / f"{shape}-{fmt}.gguf"
        if not path.is_file() or path.stat().st_mtime < newest_input:
            to_gguf(model_dir, path, fmt, overwrite=True)
        ggufs[fmt] = str(path)
    return {"model": str(model_dir), "gguf": ggufs}


# ------------------------------------------------------------------ workers (own process)
def load_pyengine(spec):
    import torch
    from pyengine.infer import generate_ids, load_model

    torch.set_num_threads(spec["threads"])
    variant = spec["variant"]
    model = load_model(spec["model"], quant="none" if variant == "fp32" else variant,
                       max_len=spec["ctx"])

    def run(prompt, n, on_token):
        generate_ids(model, prompt, max_new_tokens=n, on_token=on_token)
        return {}
    return run, f"torch {torch.__version__}"


def load_llama_cpp(spec):
    import llama_cpp

    llm = llama_cpp.Llama(model_path=spec["gguf"], n_threads=spec["threads"],
                          n_threads_batch=spec["threads"], n_ctx=spec["ctx"], verbose=False)
    ctx = llm._ctx.ctx

    def run(prompt, n, on_token):
        tokens = llm.generate(prompt, temp=0.0)
        for i, token in enumerate(tokens):
            on_token(token)
            if i + 1 == n:
                break
        tokens.close()
        evaluated = llama_cpp.llama_perf_context(ctx).n_p_eval
        llama_cpp.llama_perf_context_reset(ctx)
        llm.reset()  # else the next generate() reuses the prompt from the KV cache
        return {"prompt_evaluated": evaluated}
    llama_cpp.llama_perf_context_reset(ctx)
    info = llama_cpp.llama_print_system_info().decode().strip()
    return run, f"llama-cpp-python {llama_cpp.__version__}; {info}"


def load_transformers(spec):
    import torch
    import transformers
    from transformers.generation.streamers import BaseStreamer

    torch.set_num_threads(spec["threads"])
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[spec["variant"]]
    model = transformers.AutoModelForCausalLM.from_pretrained(spec["model"], dtype=dtype).eval()

    class Stream(BaseStreamer):
        """Hands each new token to on_token (generate's first put() is the prompt)."""
        def __init__(self, on_token):
            self.on_token, self.prompt_seen = on_token, False

        def put(self, value):
            if self.prompt_seen:
                self.on_token(int(value))
            self.prompt_seen = True

        def end(self):
            pass

    def run(prompt, n, on_token):
        model.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n,
                       do_sample=False, pad_token_id=0, streamer=Stream(on_token))
        return {}
    return run, f"transformers {transformers.__version__}, torch {torch.__version__}"


LOADERS = {"pyengine": load_pyengine, "llama.cpp": load_llama_cpp,
           "transformers": load_transformers}


def worker(spec: dict) -> None:
    """Load one engine, then answer {"prompt": [...], "new_tokens": N} lines with timings
    until stdin closes. Only the replies go to the real stdout (engines' prints -> stderr)."""
    replies = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    env = sorted(os.environ)
    t = time.perf_counter()
    run, version = LOADERS[spec["engine"]](spec)
    replies.write(json.dumps({"load_s": time.perf_counter() - t, "env": env,
                              "version": version, "python": sys.executable}) + "\n")
    for line in sys.stdin:
        request = json.loads(line)
        ids, stamps = [], []

        def on_token(token):
            stamps.append(time.perf_counter())
            ids.append(token)
        t0 = time.perf_counter()
        extra = run(request["prompt"], request["new_tokens"], on_token)
        replies.write(json.dumps({"prefill_s": stamps[0] - t0, "decode_s": stamps[-1] - stamps[0],
                                  "ids": ids, **extra}) + "\n")


# ------------------------------------------------------------------ parent (stdlib only)
def clean_env() -> dict[str, str]:
    return {k: os.environ[k] for k in PASSED_ENV if k in os.environ}


class Worker:
    def __init__(self, label: str, python: str, spec: dict):
        self.label = label
        self.proc = subprocess.Popen(
            [python, "-m", "benchmarks.bench_infer", "--worker", json.dumps(spec)], cwd=ROOT,
            env=clean_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.info = self._reply()

    def _reply(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            status = self.proc.wait()
            how = (f"was killed by {signal.Signals(-status).name}" if status < 0
                   else f"exited ({status})")
            hint = (" (an instruction this CPU or VM refuses; see benchmarks/RESULTS_infer.md "
                    "on native llama.cpp builds and AMX)" if status == -signal.SIGILL else "")
            raise RuntimeError(f"the {self.label} worker {how}{hint}; its stderr is above")
        return json.loads(line)

    def generate(self, prompt: list[int], new_tokens: int) -> dict:
        self.proc.stdin.write(json.dumps({"prompt": prompt, "new_tokens": new_tokens}) + "\n")
        self.proc.stdin.flush()
        reply = self._reply()
        if len(reply["ids"]) != new_tokens:
            raise RuntimeError(f"{self.label} made {len(reply['ids'])} tokens, not {new_tokens}")
        if reply.get("prompt_evaluated", len(prompt)) != len(prompt):
            raise RuntimeError(f"{self.label} evaluated {reply['prompt_evaluated']} of the "
                               f"{len(prompt)} prompt tokens (KV cache reused between runs)")
        return reply

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def prompt_ids(n: int, vocab: int) -> list[int]:
    """n fixed random ids, none of them BOS (0) or EOS (1)."""
    rng = random.Random(n)
    return [rng.randrange(2, vocab) for _ in range(n)]


def has_llama_cpp(python: str, module: str = "llama_cpp") -> bool:
    return subprocess.run([python, "-c", f"import {module}"], env=clean_env(),
                          capture_output=True).returncode == 0


def measure(shapes, threads, engines, *, rounds=ROUNDS, new_tokens=NEW_TOKENS, prompts=None,
            python=sys.executable, llama_python=None, cache=CACHE) -> dict:
    """Run the interleaved rounds; returns {"engines": ..., "runs": [...]} (JSON-able).
    llama.cpp is left out, with a note, when `llama_python` cannot import llama_cpp."""
    llama_python = llama_python or default_llama_python()
    pythons = {"pyengine": python, "transformers": python, "llama.cpp": llama_python}
    notes = []
    if "llama.cpp" in engines and not has_llama_cpp(llama_python):
        notes.append(f"llama.cpp not run: {llama_python} cannot import llama_cpp")
        engines = [e for e in engines if e != "llama.cpp"]
    result = {"engines": {}, "runs": [], "notes": notes, "settings": dict(
        rounds=rounds, warmup_rounds=WARMUP_ROUNDS, new_tokens=new_tokens, env=list(PASSED_ENV),
        start=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), load_start=os.getloadavg())}
    for shape in shapes:
        lengths = prompts or PROMPTS[shape]
        ctx = max(lengths) + new_tokens
        pairs = [(e, v) for e in engines for v in VARIANTS[e].get(shape, ())]
        formats = sorted({v for e, v in pairs if e == "llama.cpp"})
        out = subprocess.run([python, "-m", "benchmarks.bench_infer", "--prepare", shape,
                              "--cache", str(cache), "--formats", *formats], cwd=ROOT,
                             env=clean_env(), stdout=subprocess.PIPE, text=True, check=True)
        files = json.loads(out.stdout.splitlines()[-1])
        vocab = SHAPES[shape]["vocab_size"]
        for t in threads:
            workers = {}
            try:
                for engine, variant in pairs:
                    label = f"{engine} {variant}"
                    print(f"[{shape}, {t} threads] loading {label}", file=sys.stderr, flush=True)
                    spec = dict(engine=engine, variant=variant, threads=t, ctx=ctx,
                                model=files["model"], gguf=files["gguf"].get(variant))
                    workers[(engine, variant)] = Worker(label, pythons[engine], spec)
                    result["engines"][label] = {k: workers[(engine, variant)].info[k]
                                                for k in ("python", "version", "env")}
                for r in range(-WARMUP_ROUNDS, rounds):
                    order = list(workers)[r % len(workers):] + list(workers)[:r % len(workers)]
                    for n in lengths:
                        for engine, variant in order:
                            reply = workers[(engine, variant)].generate(prompt_ids(n, vocab),
                                                                        new_tokens)
                            if r >= 0:
                                result["runs"].append(dict(
                                    shape=shape, threads=t, prompt=n, engine=engine,
                                    weights=variant, round=r, **reply,
                                    prefill_tok_s=n / reply["prefill_s"],
                                    decode_tok_s=(new_tokens - 1) / reply["decode_s"]))
                    print(f"[{shape}, {t} threads] round {r} done", file=sys.stderr, flush=True)
            finally:
                for w in workers.values():
                    w.close()
    result["settings"]["load_end"] = os.getloadavg()
    return result


def summarize(result: dict) -> list[dict]:
    """One row per shape x threads x prompt x engine x weights: medians over rounds and, for
    ours, median per-round ratios to the peer and the shared leading greedy ids."""
    groups = {}
    for run in result["runs"]:
        key = (run["shape"], run["threads"], run["prompt"], run["engine"], run["weights"])
        groups.setdefault(key, []).append(run)
    rows = []
    for key, runs in groups.items():
        row = dict(zip(("shape", "threads", "prompt", "engine", "weights"), key),
                   prefill_tok_s=statistics.median(r["prefill_tok_s"] for r in runs),
                   decode_tok_s=statistics.median(r["decode_tok_s"] for r in runs),
                   rounds=len(runs))
        peer = PEERS.get(key[4]) if key[3] == "pyengine" else None
        peer_runs = groups.get(key[:3] + peer) if peer else None
        if peer_runs:
            row["peer"] = " ".join(peer)
            for m in ("prefill_tok_s", "decode_tok_s"):
                row[m.replace("tok_s", "ratio")] = statistics.median(
                    a[m] / b[m] for a, b in zip(runs, peer_runs))
            ours, theirs = runs[-1]["ids"], peer_runs[-1]["ids"]
            row["same_ids"] = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b),
                                   len(ours))
        rows.append(row)
    return rows


def markdown(result: dict) -> str:
    s = result["settings"]
    load = " -> ".join("/".join(f"{x:.1f}" for x in s[k]) for k in ("load_start", "load_end"))
    lines = [f"{s['start']}, load average (1/5/15 min) {load}. {s['new_tokens']} new tokens, "
             f"median of {s['rounds']} interleaved rounds after {s['warmup_rounds']} warm-up; "
             "ratios = median of per-round ours/peer.", "",
             "| shape | threads | prompt | engine | weights | prefill tok/s | decode tok/s "
             "| peer | ours/peer prefill | ours/peer decode | same greedy ids |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in summarize(result):
        ratios = (f"| {row['peer']} | {row['prefill_ratio']:.2f} | {row['decode_ratio']:.2f} "
                  f"| {row['same_ids']}/{s['new_tokens']} |" if "peer" in row else "| | | | |")
        lines.append(f"| {row['shape']} | {row['threads']} | {row['prompt']} | {row['engine']} "
                     f"| {row['weights']} | {row['prefill_tok_s']:.1f} | {row['decode_tok_s']:.1f} "
                     + ratios)
    lines.append("")
    lines += [f"- {label}: {e['python']}, {e['version'].split(';')[0]}"
              for label, e in result["engines"].items()]
    lines += [f"- {note}" for note in result["notes"]]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", action="append", choices=tuple(SHAPES),
                    help="repeatable (default 135m)")
    ap.add_argument("--threads", type=int, nargs="+", default=[2])
    ap.add_argument("--engines", nargs="+", choices=tuple(VARIANTS), default=list(VARIANTS))
    ap.add_argument("--rounds", type=int, default=ROUNDS)
    ap.add_argument("--new-tokens", type=int, default=NEW_TOKENS)
    ap.add_argument("--prompt-tokens", type=int, nargs="+",
                    help=f"prompt lengths (default per shape: {PROMPTS})")
    ap.add_argument("--quick", action="store_true",
                    help="check the harness: 135m, 8 new tokens, 1 round")
    ap.add_argument("--python", default=sys.executable,
                    help="interpreter for pyengine and transformers")
    ap.add_argument("--llama-python", help="interpreter for llama.cpp (default "
                    f"{' or '.join(LLAMA_VENVS)} if present, else this one)")
    ap.add_argument("--cache", type=Path, default=CACHE,
                    help="model directories and GGUF files")
    ap.add_argument("--json", action="store_true",
                    help="print JSON (every run) instead of markdown")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--prepare", choices=tuple(SHAPES), help=argparse.SUPPRESS)
    ap.add_argument("--formats", nargs="*", default=[], help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        worker(json.loads(a.worker))
        return 0
    if a.prepare:
        print(json.dumps(prepare(a.prepare, a.formats, a.cache)))
        return 0
    for flag, values, least in (("--threads", a.threads, 1), ("--rounds", [a.rounds], 1),
                                ("--prompt-tokens", a.prompt_tokens or [], 1),
                                ("--new-tokens", [a.new_tokens], 2)):
        if any(v < least for v in values):
            ap.error(f"{flag} must be >= {least}, got {' '.join(map(str, values))}")
    if a.quick:
        a.shape, a.new_tokens, a.rounds = ["135m"], 8, 1
    result = measure(a.shape or ["135m"], a.threads, a.engines, rounds=a.rounds,
                     new_tokens=a.new_tokens, prompts=a.prompt_tokens, python=a.python,
                     llama_python=a.llama_python, cache=a.cache)
    result["summary"] = summarize(result)
    print(json.dumps(result, indent=1) if a.json else markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())


# ------------------------------------------------------------------ pytest entries
def test_harness_tiny(monkeypatch):
    """The harness on a tiny model: our variables never reach a worker, every engine makes
    exactly N tokens each round, llama.cpp re-evaluates the whole prompt every round (the
    harness raises otherwise), and our fp32 greedy ids equal transformers'."""
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    monkeypatch.setenv("PYENGINE_BENCH_PROBE", "1")
    result = measure(["tiny"], [1], list(VARIANTS), rounds=2, new_tokens=6)
    for label, engine in result["engines"].items():
        assert set(engine["env"]) <= set(PASSED_ENV), (label, engine["env"])
    runs = {(r["engine"], r["weights"], r["round"]): r for r in result["runs"]}
    expected = {(e, v, r) for e in VARIANTS for v in VARIANTS[e]["tiny"] for r in (0, 1)
                if f"{e} {v}" in result["engines"]}
    assert set(runs) == expected
    assert runs[("pyengine", "fp32", 1)]["ids"] == runs[("transformers", "fp32", 1)]["ids"]
    row = next(r for r in summarize(result) if r["engine"] == "pyengine" and r["weights"] == "fp32")
    assert row["peer"] == "transformers fp32" and row["same_ids"] == 6


def test_decode_135m_gates(benchmark):
    """135m, 2 threads: our q8_0 and q4_0 decode >= llama.cpp's on the same weights, measured
    in this run. The timed body is the whole interleaved run (workers' load included)."""
    import pytest

    llama_python = default_llama_python()
    if not has_llama_cpp(llama_python):
        pytest.skip(f"llama.cpp is not installed for {llama_python}")
    result = benchmark.pedantic(measure, args=(["135m"], [2], ["pyengine", "llama.cpp"]),
                                kwargs=dict(rounds=3, llama_python=llama_python),
                                rounds=1, iterations=1)
    rows = {row["weights"]: row for row in summarize(result) if row["engine"] == "pyengine"}
    benchmark.extra_info.update({f"decode_ratio_{v}": rows[v]["decode_ratio"]
                                 for v in ("q8_0", "q4_0")})
    for v in ("q8_0", "q4_0"):
        assert rows[v]["decode_ratio"] >= 1.0, (v, rows[v])
