"""Serving speed, measured from the client side of an OpenAI-compatible server: ours
(python -m pyengine.serve, continuous batching) vs llama-cpp-python's server, plus the
single-stream library (pyengine.infer) as the latency reference.

    python benchmarks/bench_serve.py --shape 135m --shape 1b --json serve.json   # the table
    python benchmarks/bench_serve.py --quick      # harness check: tiny model, 1 round
    make bench-serve [LLAMA_NO_AMX=1]             # the peer + its [server] extras, then the above
    pytest benchmarks/bench_serve.py              # a tiny-shape harness test

Model: bench_infer's random-weight Llama shapes (tiny / 135m / 1b, the same weights), q4_0
for every engine, with a tokenizer whose every id is a token of visible text (byte-level
BPE: the 256 bytes, <s>, </s>, then letter pairs and triples until the model's vocabulary is
full), so each generated token reaches the client as text. Adapters: a0..a3, PEFT LoRA rank
16 on all linear layers (random A and B, std 0.02), written with peft.
Servers, each its own process started with only bench_infer's PASSED_ENV variables (PATH,
HOME, locale, ...; our CLI then sets OMP_WAIT_POLICY=PASSIVE for itself, as for any user),
all of one shape x thread count up together:
  ours       python -m pyengine.serve --model DIR --quant q4_0 --max-batch 8 --threads T
             --max-len L (no adapters);
  ours+lora  the same with --adapter a0=DIR0 ... --adapter a3=DIR3;
  llama.cpp  python -m llama_cpp.server --model F.gguf (pyengine.export's q4_0) --n_threads T
             --n_threads_batch T --n_ctx L --logits_all False --interrupt_requests False.
             Its server holds one Llama behind a lock: requests run one at a time (no
             batching; no n_parallel setting). interrupt_requests (default True) would end
             a running stream as soon as another request waits, so it is off; logits_all
             (default True) computes logits for every prompt token, so it is off too;
  infer      bench_infer's pyengine worker: load_model(quant=q4_0) + generate_ids, one
             stream, the token ids of the same prompt.
Client: N threads (stdlib http.client), released together, each POSTs one streaming
/v1/completions (greedy, max_tokens M, stream_options.include_usage) and timestamps every
SSE chunk that carries a choice. Completion tokens: `usage` when the server sends it, else
M when finish_reason is "length", else the count of chunks (flagged "estimated"). EOS is
not suppressed: random weights rarely sample it. Per stream: time to first token (TTFT) =
first chunk - request sent; inter-token latency (ITL) = (last chunk - first chunk) /
(tokens - 1). Per run of N streams: aggregate decode tok/s = sum(tokens - 1) / (last chunk
of any stream - first chunk of any stream) (it includes the later streams' prefill, which
runs while the first ones decode); tok/s while all decode = chunks of all streams in (last
first chunk, first last chunk] / that interval (every stream past its prefill and not done:
the batched decode rate). Every prompt is distinct (per round and
stream; llama.cpp would reuse a KV prefix it shares with the previous prompt), the same
texts for every server. One warm-up round (not counted); round r runs every (server,
streams) unit once, the unit order rotated by r. Reported: medians over rounds (TTFT and
ITL: of the per-run medians over streams) and ratios as medians of per-round ratios. The
CPU time each server spent while other units ran is recorded (an idle server should use
none, else interleaving is unfair).
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import socket
import statistics
import string
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.bench_infer import (  # noqa: E402
    PASSED_ENV, SHAPES, Worker, clean_env, default_llama_python, has_llama_cpp)
from benchmarks.bench_infer import prepare as prepare_model  # noqa: E402

QUANT, MAX_BATCH, LORA_RANK = "q4_0", 8, 16
ADAPTERS = ("a0", "a1", "a2", "a3")  # served names of the adapters
NEW_TOKENS, PROMPT_TOKENS, ROUNDS, WARMUP_ROUNDS = 128, 100, 3, 1
STREAMS = (1, 8)
CACHE = Path("/tmp/pyengine_bench_serve")
START_TIMEOUT_S = 600
LLAMA_SERVER = "llama_cpp.server.app"  # importable once llama-cpp-python[server] is installed
ENGINES = ("ours", "llama.cpp", "infer")
# (label, numerator unit, denominator unit, metric, target): units are (engine, streams,
# adapters), streams "N" = the most streams of the run; target ">= x" or "<= x" or None.
RATIOS = (("ours N={N} / ours N=1 aggregate decode", ("ours", "N", False), ("ours", 1, False),
           "agg_tok_s", ">= 3"),
          ("ours N={N} / ours N=1 decode while all N decode", ("ours", "N", False),
           ("ours", 1, False), "steady_tok_s", ">= 3"),
          ("ours N=1 ITL / pyengine.infer per-token", ("ours", 1, False), ("infer", 1, False),
           "itl_s", "<= 1.1"),
          ("ours {N} streams over 4 adapters / ours {N} base", ("ours", "N", True),
           ("ours", "N", False), "agg_tok_s", ">= 0.8"),
          ("ours {N} streams over 4 adapters / ours {N} base, while all decode", ("ours", "N", True),
           ("ours", "N", False), "steady_tok_s", ">= 0.8"),
          ("ours / llama.cpp N=1 aggregate decode", ("ours", 1, False), ("llama.cpp", 1, False),
           "agg_tok_s", None),
          ("ours / llama.cpp N={N} aggregate decode", ("ours", "N", False),
           ("llama.cpp", "N", False), "agg_tok_s", None),
          ("ours / llama.cpp N={N} TTFT", ("ours", "N", False), ("llama.cpp", "N", False),
           "ttft_s", None))


# ------------------------------------------------------------------ inputs (own process)
def save_letters_tokenizer(path: Path, vocab_size: int):
    """Byte-level BPE filling `vocab_size` ids: <s>, </s>, the 256 byte symbols, then merges
    of ASCII letters (pairs, then pair + letter), so that every id but the 128 non-ASCII
    bytes decodes alone to text (random weights' tokens reach the client one by one)."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    letters = string.ascii_letters
    vocab = {"<s>": 0, "</s>": 1}
    for symbol in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[symbol] = len(vocab)
    candidates = ([(a, b) for a in letters for b in letters]
                  + [(a + b, c) for a in letters for b in letters for c in letters])
    merges = []
    for left, right in candidates[:max(vocab_size - len(vocab), 0)]:
        merges.append((left, right))
        vocab[left + right] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<s>", "</s>"])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>",
                                                eos_token="</s>")
    fast.save_pretrained(path)
    return fast


def save_adapters(model_dir: Path, cache: Path, n: int) -> list[str]:
    """n PEFT LoRA adapters (rank LORA_RANK, all linear layers, random A and B) for the model
    in model_dir, each built once (complete or absent)."""
    import shutil

    dirs = [cache / f"{model_dir.name}-lora{LORA_RANK}-a{i}" for i in range(n)]
    missing = [(i, d) for i, d in enumerate(dirs) if not d.is_dir()]
    if missing:
        import peft
        import torch
        import transformers

        base = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
        model = peft.get_peft_model(base, peft.LoraConfig(
            r=LORA_RANK, lora_alpha=2 * LORA_RANK, target_modules="all-linear"))
        for i, d in missing:
            gen = torch.Generator().manual_seed(1000 + i)
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if "lora_" in name:
                        p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
            partial = d.with_name(d.name + ".partial")
            shutil.rmtree(partial, ignore_errors=True)
            model.save_pretrained(partial)
            partial.rename(d)
    return [str(d) for d in dirs]


def make_prompts(model_dir: Path, count: int, tokens: int) -> list[dict]:
    """`count` texts of random letter words, each grown to `tokens` or a few more tokens of
    the model's tokenizer, with their token ids (for the library worker). Text i starts with
    letter i mod 52: neighbours never share a first token (llama.cpp reuses the KV cache of
    a prefix shared with the previous prompt)."""
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    prompts = []
    for i in range(count):
        rng = random.Random(i)
        words = [string.ascii_letters[i % len(string.ascii_letters)]]
        while len(tok(" ".join(words)).input_ids) < tokens:
            words.append("".join(rng.choices(string.ascii_letters, k=rng.randint(1, 7))))
        text = " ".join(words)
        prompts.append({"text": text, "ids": tok(text).input_ids})
    return prompts


def prepare(shape: str, cache: Path, n_adapters: int, n_prompts: int, prompt_tokens: int):
    """bench_infer's model at `shape` with our tokenizer, its q4_0 GGUF, the adapters and
    the prompts (JSON-able)."""
    from functools import partial

    files = prepare_model(shape, [QUANT], cache, save_tokenizer=partial(
        save_letters_tokenizer, vocab_size=SHAPES[shape]["vocab_size"]))
    model_dir = Path(files["model"])
    return dict(files, adapters=save_adapters(model_dir, cache, n_adapters),
                prompts=make_prompts(model_dir, n_prompts, prompt_tokens))


# ------------------------------------------------------------------ servers and clients
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Server:
    """One server process on a free local port, its output in `log`; ready when /v1/models
    answers (its ids: self.models; the names in its environment: self.env)."""

    def __init__(self, label: str, argv: list[str], log: Path):
        self.label, self.port, self.log = label, free_port(), log
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "w") as out:
            self.proc = subprocess.Popen(
                argv + ["--host", "127.0.0.1", "--port", str(self.port)], cwd=ROOT,
                env=clean_env(), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the {label} server exited ({self.proc.returncode}) while "
                                   f"starting; its output: {log}\n{self.log_tail()}")
            try:
                self.models = [m["id"] for m in self.get("/v1/models")["data"]]
                break
            except (OSError, http.client.HTTPException):
                if time.monotonic() > deadline:
                    self.close()
                    raise RuntimeError(f"the {label} server did not answer within "
                                       f"{START_TIMEOUT_S} s; its output: {log}") from None
                time.sleep(0.5)
        environ = Path(f"/proc/{self.proc.pid}/environ").read_bytes().split(b"\0")
        self.env = sorted(v.split(b"=", 1)[0].decode() for v in environ if v)

    def log_tail(self, lines: int = 20) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def get(self, path: str) -> dict:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            body = resp.read()
            if resp.status != 200:
                raise http.client.HTTPException(f"GET {path}: {resp.status}")
            return json.loads(body)
        finally:
            conn.close()

    def stream(self, model: str, prompt: str, max_tokens: int) -> dict:
        """One streaming completion; returns its timestamps and token count."""
        body = json.dumps({"model": model, "prompt": prompt, "max_tokens": max_tokens,
                           "temperature": 0, "stream": True,
                           "stream_options": {"include_usage": True}})
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=START_TIMEOUT_S)
        try:
            sent = time.perf_counter()
            conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
            resp = conn.getresponse()
            if resp.status != 200:
                raise RuntimeError(f"{self.label}: POST /v1/completions answered {resp.status}: "
                                   f"{resp.read(2000).decode(errors='replace')}")
            stamps, usage, finish = [], None, None
            for line in resp:
                now = time.perf_counter()
                if not line.startswith(b"data:"):
                    continue  # blank separators, ": ping" comments
                data = line[5:].strip()
                if data == b"[DONE]":
                    break
                chunk = json.loads(data)
                usage = chunk.get("usage") or usage
                for choice in chunk.get("choices") or ():
                    stamps.append(now)
                    finish = choice.get("finish_reason") or finish
        finally:
            conn.close()
        if finish is None:
            raise RuntimeError(f"{self.label}: a stream ended after {len(stamps)} chunks "
                               "without a finish_reason (interrupted by another request?)")
        if usage:
            tokens, estimated = usage["completion_tokens"], False
        elif finish == "length":
            tokens, estimated = max_tokens, False
        else:
            tokens, estimated = len(stamps), True
        if len(stamps) < 2 or tokens < 2:
            raise RuntimeError(f"{self.label}: a stream gave {tokens} tokens in {len(stamps)} "
                               f"chunks (finish_reason {finish}); need 2+ to time decoding")
        return dict(sent=sent, first=stamps[0], last=stamps[-1], stamps=stamps, tokens=tokens,
                    chunks=len(stamps), estimated=estimated, finish=finish, ttft_s=stamps[0] - sent,
                    itl_s=(stamps[-1] - stamps[0]) / (tokens - 1))

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def concurrent_streams(server: Server, jobs: list[tuple[str, str]], max_tokens: int) -> dict:
    """Run `jobs` (model, prompt) as simultaneous streams, one client thread each, released
    together; returns the per-stream records and the run's aggregates."""
    release = threading.Barrier(len(jobs))
    streams, errors = [None] * len(jobs), []

    def client(i):
        try:
            release.wait()
            streams[i] = server.stream(*jobs[i], max_tokens)
        except Exception as e:  # noqa: BLE001 -- re-raised in the caller's thread
            errors.append(e)
            release.abort()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    span = max(s["last"] for s in streams) - min(s["first"] for s in streams)
    # while every stream decodes: from the last first token to the first last token
    t0, t1 = max(s["first"] for s in streams), min(s["last"] for s in streams)
    inside = sum(t0 < t <= t1 for s in streams for t in s.pop("stamps"))
    return dict(per_stream=streams, agg_tok_s=sum(s["tokens"] - 1 for s in streams) / span,
                steady_tok_s=inside / (t1 - t0) if t1 > t0 else float("nan"),
                ttft_s=statistics.median(s["ttft_s"] for s in streams),
                itl_s=statistics.median(s["itl_s"] for s in streams))


def infer_run(worker: Worker, ids: list[int], new_tokens: int) -> dict:
    """One pyengine.infer generation in the same terms as a 1-stream server run."""
    reply = worker.generate(ids, new_tokens)
    per_token = reply["decode_s"] / (new_tokens - 1)
    return dict(agg_tok_s=1 / per_token, steady_tok_s=1 / per_token, ttft_s=reply["prefill_s"],
                itl_s=per_token)


# ------------------------------------------------------------------ the run
def start_servers(labels, files, threads, max_len, python, llama_python, log_dir):
    """{label: Server} for `labels` (ours, ours+lora, llama.cpp) at one thread count."""
    ours = [python, "-m", "pyengine.serve", "--model", files["model"], "--quant", QUANT,
            "--max-batch", str(MAX_BATCH), "--threads", str(threads), "--max-len", str(max_len)]
    argvs = {
        "ours": ours,
        "ours+lora": ours + [arg for name, d in zip(ADAPTERS, files["adapters"])
                             for arg in ("--adapter", f"{name}={d}")],
        "llama.cpp": [
            llama_python, "-m", "llama_cpp.server", "--model", files["gguf"][QUANT],
            "--n_threads", str(threads), "--n_threads_batch", str(threads),
            "--n_ctx", str(max_len), "--logits_all", "False", "--interrupt_requests", "False",
            "--verbose", "False"]}
    servers = {}
    try:
        for label in labels:
            argv = argvs[label]
            print(f"[{threads} threads] starting the {label} server", file=sys.stderr, flush=True)
            servers[label] = Server(label, argv, log_dir / f"{label}-{threads}t.log")
    except BaseException:
        for s in servers.values():
            s.close()
        raise
    return servers


def measure(shapes, threads, engines, *, streams=STREAMS, rounds=ROUNDS, new_tokens=NEW_TOKENS,
            prompt_tokens=PROMPT_TOKENS, python=sys.executable, llama_python=None,
            cache=CACHE) -> dict:
    """Run the interleaved rounds; returns {"settings", "servers", "runs", "notes"}."""
    llama_python = llama_python or default_llama_python()
    engines, notes = list(engines), []
    if "llama.cpp" in engines and not has_llama_cpp(llama_python, LLAMA_SERVER):
        notes.append(f"llama.cpp not run: {llama_python} cannot import {LLAMA_SERVER} (`make "
                     "bench-serve` installs llama-cpp-python[server])")
        engines.remove("llama.cpp")
    result = {"runs": [], "servers": {}, "notes": notes, "settings": dict(
        quant=QUANT, max_batch=MAX_BATCH, streams=list(streams), rounds=rounds,
        warmup_rounds=WARMUP_ROUNDS, new_tokens=new_tokens, prompt_tokens=prompt_tokens,
        env=list(PASSED_ENV), start=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        load_start=os.getloadavg())}
    width = max(streams)
    # round r, n streams: prompts[first[r, n]:][:n], the same texts for every server
    first, n_prompts = {}, 0
    for r in range(-WARMUP_ROUNDS, rounds):
        for n in streams:
            first[r, n], n_prompts = n_prompts, n_prompts + n
    for shape in shapes:
        out = subprocess.run(
            [python, "-m", "benchmarks.bench_serve", "--prepare", shape, "--cache", str(cache),
             "--n-prompts", str(n_prompts), "--prompt-tokens", str(prompt_tokens)],
            cwd=ROOT, env=clean_env(), stdout=subprocess.PIPE, text=True, check=True)
        files = json.loads(out.stdout.splitlines()[-1])
        prompts = files["prompts"]
        max_len = max(len(p["ids"]) for p in prompts) + new_tokens + 16
        for t in threads:
            units = []  # (server label or "infer", engine, streams, adapters)
            for n in streams:
                units += [(e, e, n, False) for e in ("ours", "llama.cpp") if e in engines]
            if "ours" in engines and width > 1:
                units.append(("ours+lora", "ours", width, True))
            if "infer" in engines:
                units.append(("infer", "infer", 1, False))
            servers = start_servers(dict.fromkeys(u[0] for u in units if u[0] != "infer"),
                                    files, t, max_len, python, llama_python, cache / "logs")
            infer = None
            try:
                if "infer" in engines:
                    infer = Worker("pyengine.infer", python, dict(
                        engine="pyengine", variant=QUANT, threads=t, ctx=max_len,
                        model=files["model"]))
                idle = {label: 0.0 for label in servers}
                for label, s in servers.items():
                    result["servers"][f"{shape} {t}t {label}"] = dict(
                        argv=s.proc.args, models=s.models, env=s.env, log=str(s.log))
                for r in range(-WARMUP_ROUNDS, rounds):
                    order = units[r % len(units):] + units[:r % len(units)]
                    for label, engine, n, adapters in order:
                        batch = prompts[first[r, n]:first[r, n] + n]
                        cpu = {k: cpu_seconds(s.proc.pid) for k, s in servers.items()}
                        if label == "infer":
                            run = infer_run(infer, batch[0]["ids"], new_tokens)
                        else:
                            server = servers[label]
                            base = next(m for m in server.models if m not in ADAPTERS)
                            jobs = [(ADAPTERS[i % len(ADAPTERS)] if adapters else base,
                                     p["text"]) for i, p in enumerate(batch)]
                            run = concurrent_streams(server, jobs, new_tokens)
                        for k, s in servers.items():
                            if k != label and r >= 0:
                                idle[k] += cpu_seconds(s.proc.pid) - cpu[k]
                        if r >= 0:
                            result["runs"].append(dict(
                                shape=shape, threads=t, server=label, engine=engine, streams=n,
                                adapters=adapters, round=r,
                                prompt_tokens=[len(p["ids"]) for p in batch], **run))
                    print(f"[{shape}, {t} threads] round {r} done", file=sys.stderr, flush=True)
                for k, v in idle.items():
                    result["servers"][f"{shape} {t}t {k}"]["idle_cpu_s"] = v
            finally:
                for s in servers.values():
                    s.close()
                if infer:
                    infer.close()
    result["settings"]["load_end"] = os.getloadavg()
    return result


def summarize(result: dict) -> dict:
    """Rows: medians over rounds per (shape, threads, engine, streams, adapters); ratios:
    medians of the per-round ratios of RATIOS, with their targets."""
    groups = {}
    for run in result["runs"]:
        key = (run["shape"], run["threads"], run["engine"], run["streams"], run["adapters"])
        groups.setdefault(key, []).append(run)
    rows = [dict(zip(("shape", "threads", "engine", "streams", "adapters"), key),
                 rounds=len(runs), **{m: statistics.median(r[m] for r in runs)
                                      for m in ("agg_tok_s", "steady_tok_s", "ttft_s", "itl_s")})
            for key, runs in groups.items()]
    ratios, wide = [], max(result["settings"]["streams"])
    for shape, t in dict.fromkeys((k[0], k[1]) for k in groups):
        for label, num, den, metric, target in RATIOS:
            a, b = (groups.get((shape, t, e, wide if n == "N" else n, lora))
                    for e, n, lora in (num, den))
            if a and b:
                value = statistics.median(x[metric] / y[metric] for x, y in zip(a, b))
                met = None
                if target:
                    op, bound = target.split()
                    met = value >= float(bound) if op == ">=" else value <= float(bound)
                ratios.append(dict(shape=shape, threads=t, ratio=label.format(N=wide),
                                   metric=metric, value=value, target=target, met=met))
    return {"rows": rows, "ratios": ratios}


def markdown(result: dict) -> str:
    s, summary = result["settings"], result["summary"]
    load = " -> ".join("/".join(f"{x:.1f}" for x in s[k]) for k in ("load_start", "load_end"))
    lines = [f"{s['start']}, load average (1/5/15 min) {load}. {s['quant']}, "
             f"{s['new_tokens']} new tokens per stream, prompts ~{s['prompt_tokens']} tokens, "
             f"greedy; medians of {s['rounds']} interleaved rounds after {s['warmup_rounds']} "
             "warm-up; ratios = median of per-round ratios.", "",
             "| shape | threads | engine | streams | adapters | aggregate decode tok/s "
             "| tok/s while all decode | TTFT ms | ITL ms |", "|---|---|---|---|---|---|---|---|---|"]
    for r in summary["rows"]:
        adapters = f"{ADAPTERS[0]}..{ADAPTERS[-1]}" if r["adapters"] else "-"
        steady = "-" if r["steady_tok_s"] != r["steady_tok_s"] else f"{r['steady_tok_s']:.1f}"
        lines.append(f"| {r['shape']} | {r['threads']} | {r['engine']} | {r['streams']} "
                     f"| {adapters} | {r['agg_tok_s']:.1f} | {steady} "
                     f"| {1e3 * r['ttft_s']:.0f} | {1e3 * r['itl_s']:.1f} |")
    lines += ["", "| shape | threads | ratio | value | target |", "|---|---|---|---|---|"]
    for r in summary["ratios"]:
        target = f"{r['target']}: {'met' if r['met'] else 'NOT met'}" if r["target"] else ""
        lines.append(f"| {r['shape']} | {r['threads']} | {r['ratio']} | {r['value']:.2f} "
                     f"| {target} |")
    lines.append("")
    estimated = sum(st["estimated"] for run in result["runs"] for st in run.get("per_stream", ()))
    if estimated:
        lines.append(f"- {estimated} stream(s) ended before max_tokens without `usage`: "
                     "their token counts are chunk counts")
    for label, info in result["servers"].items():
        if info.get("idle_cpu_s", 0) > 0.5:
            lines.append(f"- the {label} server used {info['idle_cpu_s']:.1f} s CPU while "
                         "other units ran")
    lines += [f"- {note}" for note in result["notes"]]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", action="append", choices=tuple(SHAPES),
                    help="repeatable (default 135m)")
    ap.add_argument("--threads", type=int, nargs="+", default=[2])
    ap.add_argument("--engines", nargs="+", choices=ENGINES, default=list(ENGINES))
    ap.add_argument("--streams", type=int, nargs="+", default=list(STREAMS),
                    help=f"concurrent streams per run, at most {MAX_BATCH}")
    ap.add_argument("--rounds", type=int, default=ROUNDS)
    ap.add_argument("--new-tokens", type=int, default=NEW_TOKENS)
    ap.add_argument("--prompt-tokens", type=int, default=PROMPT_TOKENS)
    ap.add_argument("--quick", action="store_true",
                    help="check the harness: tiny shape, 16 new tokens, 1 round")
    ap.add_argument("--python", default=sys.executable,
                    help="interpreter for our server and pyengine.infer")
    ap.add_argument("--llama-python", help="interpreter with llama-cpp-python[server] "
                    "(default as bench_infer.py)")
    ap.add_argument("--cache", type=Path, default=CACHE,
                    help="model directories, GGUF files, adapters, server logs")
    ap.add_argument("--json", type=Path, help="also write every run to this JSON file")
    ap.add_argument("--prepare", choices=tuple(SHAPES), help=argparse.SUPPRESS)
    ap.add_argument("--n-prompts", type=int, default=1, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.prepare:
        print(json.dumps(prepare(a.prepare, a.cache, len(ADAPTERS), a.n_prompts,
                                 a.prompt_tokens)))
        return 0
    for flag, values, least, most in (("--threads", a.threads, 1, None),
                                      ("--rounds", [a.rounds], 1, None),
                                      ("--streams", a.streams, 1, MAX_BATCH),
                                      ("--prompt-tokens", [a.prompt_tokens], 1, None),
                                      ("--new-tokens", [a.new_tokens], 2, None)):
        if any(v < least or (most and v > most) for v in values):
            ap.error(f"{flag} must be >= {least}{f' and <= {most}' if most else ''}, got "
                     f"{' '.join(map(str, values))}")
    if a.quick:
        a.shape, a.new_tokens, a.rounds, a.prompt_tokens = ["tiny"], 16, 1, 32
    result = measure(a.shape or ["135m"], a.threads, a.engines, streams=sorted(set(a.streams)),
                     rounds=a.rounds, new_tokens=a.new_tokens, prompt_tokens=a.prompt_tokens,
                     python=a.python, llama_python=a.llama_python, cache=a.cache)
    result["summary"] = summarize(result)
    if a.json:
        a.json.write_text(json.dumps(result, indent=1) + "\n")
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())


# ------------------------------------------------------------------ pytest entries
def test_harness_tiny(monkeypatch, tmp_path):
    """The harness on a tiny model, 1 and 2 streams: our variables never reach a server
    (our CLI adds OMP_WAIT_POLICY=PASSIVE itself, by re-executing; pyengine.cli),
    every unit runs each round, every stream makes exactly max_tokens tokens counted
    exactly (a llama.cpp server left at interrupt_requests=True ends the first of two
    concurrent streams early), and every ratio of RATIOS is reported."""
    import pytest

    pytest.importorskip("pyengine.serve")
    from pyengine.cli import PASSIVE_MARK
    llama_python = default_llama_python()
    if not has_llama_cpp(llama_python, LLAMA_SERVER):
        pytest.skip(f"{llama_python} cannot import {LLAMA_SERVER}")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("PYENGINE_BENCH_PROBE", "1")
    result = measure(["tiny"], [1], list(ENGINES), streams=(1, 2), rounds=2, new_tokens=5,
                     prompt_tokens=12, llama_python=llama_python, cache=tmp_path)
    for label, server in result["servers"].items():
        assert set(server["env"]) <= {*PASSED_ENV, "OMP_WAIT_POLICY", PASSIVE_MARK}, (
            label, server["env"])
    units = {(r["server"], r["streams"], r["round"]) for r in result["runs"]}
    assert units == {(s, n, r) for r in (0, 1) for s, n in (
        ("ours", 1), ("ours", 2), ("llama.cpp", 1), ("llama.cpp", 2), ("ours+lora", 2),
        ("infer", 1))}
    for run in result["runs"]:
        for stream in run.get("per_stream", ()):
            assert (stream["tokens"], stream["finish"], stream["estimated"]) == (5, "length",
                                                                                  False), run
    ratios = [r["ratio"] for r in summarize(result)["ratios"]]
    assert ratios == [label.format(N=2) for label, *_ in RATIOS]
