"""pyengine.serve: `python -m pyengine.serve` run as a subprocess on a free port and driven with
the official openai client (outputs equal to pyengine.infer's, streams, concurrency,
disconnects, adapters at run time, every error case, the API key), plus in-process checks of
what a subprocess cannot show (a chat template missing, one request's engine failure)."""
import concurrent.futures
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from pyengine.infer import TextStreamer, generate_ids, load_model, load_tokenizer
from tests.conftest import num_threads
from tests.test_batch import _peft_adapter
from tests.tiny_llama import save_tiny_model

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("prometheus_client")

ROOT = Path(__file__).resolve().parents[1]
KEY = "sk-test-key"
PROMPTS = ["hello world, the quick", "the lazy dog", "pyengine runs", "café and naïve",
           "tiny model", "brown fox jumps", "over the", "words too"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny Llama with a 32768-position context (the slow server uses it all) and three
    PEFT adapters of different targets."""
    root = tmp_path_factory.mktemp("serve")
    hf, _ = save_tiny_model(root / "tiny", max_position_embeddings=32768)
    _peft_adapter(root / "a1", hf, ["q_proj", "v_proj", "down_proj"], seed=1)
    _peft_adapter(root / "a2", hf, ["k_proj", "o_proj", "gate_proj", "up_proj"], seed=2, r=8)
    _peft_adapter(root / "a3", hf, ["q_proj", "up_proj"], seed=3)
    return root


class Server:
    """`python -m pyengine.serve ... --port 0` in a subprocess; ready once /health answers."""

    def __init__(self, log: Path, *args, key=None):
        self.log = log
        with open(log, "w") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "pyengine.serve", "--port", "0", "--threads", "1", *args],
                cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        deadline = time.monotonic() + 120
        ready = re.compile(r"Uvicorn running on (http://127\.0\.0\.1:\d+)")
        while not (m := ready.search(log.read_text())):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the server did not start:\n{log.read_text()}")
            time.sleep(0.1)
        self.url = m.group(1)
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=60)
        assert self.http.get("/health").status_code == 200
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key=key or "none",
                                    max_retries=0, timeout=60)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def metric(self, name: str) -> float:
        text = self.http.get("/metrics").text
        m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
        return float(m.group(1)) if m else 0.0

    def wait_health(self, **want):
        deadline = time.monotonic() + 30
        while (h := self.http.get("/health").json()) and any(h[k] != v for k, v in want.items()):
            assert time.monotonic() < deadline, f"/health stayed {h}, wanted {want}"
            time.sleep(0.02)


@pytest.fixture(scope="module")
def server(files, tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("log") / "server.log", "--model", str(files / "tiny"),
               "--adapter", f"a1={files / 'a1'}", "--adapter", f"a2={files / 'a2'}",
               "--max-batch", "8", "--max-len", "256", "--prefill-chunk", "8")
    yield s
    s.stop()
    # SIGTERM: uvicorn's graceful stop (the lifespan joins the engine thread), then the
    # process ends by the signal it caught, as uvicorn does
    assert s.proc.returncode == -signal.SIGTERM, s.log.read_text()
    assert "Application shutdown complete." in s.log.read_text()


@pytest.fixture(scope="module")
def slow(files, tmp_path_factory):
    """One slot, one waiting request at most, a long context (long streams), an API key."""
    s = Server(tmp_path_factory.mktemp("log") / "slow.log", "--model", str(files / "tiny"),
               "--max-batch", "1", "--max-queue", "1", "--max-len", "32768", "--api-key", KEY,
               key=KEY)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def tok(files):
    return load_tokenizer(str(files / "tiny"))


_models = {}


def reference(files, tok, prompt_ids, max_tokens, adapter=None, **sampling):
    """pyengine.infer's tokens for the prompt (the adapter merged), as (text, ids)."""
    with num_threads(1):  # a tiny model: thread hand-offs would cost 100x the work
        if adapter not in _models:
            _models[adapter] = load_model(files / "tiny", adapter=adapter and files / adapter)
        ids, _ = generate_ids(_models[adapter], prompt_ids, max_new_tokens=max_tokens,
                              **{"stop_ids": (tok.eos_token_id,), **sampling})
    return tok.decode(ids, skip_special_tokens=True), ids


def finish_of(ids, max_tokens, eos=1):
    return "stop" if ids[-1] == eos else "length"


def chat_ids(tok, messages):
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tok(text, add_special_tokens=False)["input_ids"]


def streamed(stream):
    """(joined text, finish_reason, usage or None) of a completion or chat stream."""
    pieces, finish, use = [], None, None
    for chunk in stream:
        if chunk.usage is not None:
            use = chunk.usage
        for choice in chunk.choices:
            piece = choice.text if hasattr(choice, "text") else choice.delta.content
            pieces.append(piece or "")
            finish = choice.finish_reason or finish
    return "".join(pieces), finish, use


def error_of(response):
    """(status, error body) of an httpx response."""
    return response.status_code, response.json()["error"]


def test_models_list_base_and_adapters(server):
    models = server.client.models.list().data
    assert [m.id for m in models] == ["tiny", "a1", "a2"]
    assert {m.owned_by for m in models} == {"pyengine"} and {m.object for m in models} == {"model"}
    assert server.client.models.retrieve("a2").id == "a2"
    with pytest.raises(openai.NotFoundError):
        server.client.models.retrieve("nope")


@pytest.mark.parametrize("model", ["tiny", "a1", "a2"])
def test_greedy_completion_equals_infer_and_usage_is_exact(server, files, tok, model):
    ids = tok(PROMPTS[0])["input_ids"]
    text, ref = reference(files, tok, ids, 24, None if model == "tiny" else model)
    r = server.client.completions.create(model=model, prompt=PROMPTS[0], max_tokens=24,
                                         temperature=0)
    assert r.choices[0].text == text and r.choices[0].finish_reason == finish_of(ref, 24)
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (
        len(ids), len(ref), len(ids) + len(ref))
    assert r.object == "text_completion" and r.model == model
    for prompt in ([PROMPTS[0]], ids):  # a list of one string; token ids
        again = server.client.completions.create(model=model, prompt=prompt, max_tokens=24,
                                                 temperature=0)
        assert (again.choices[0].text, again.usage) == (text, r.usage)
    if model != "tiny":  # the adapter is applied: its output is not the base's
        assert text != reference(files, tok, ids, 24)[0]


def test_streamed_completion_and_chat_equal_the_whole_reply(server, files, tok):
    kw = dict(model="a1", max_tokens=20, temperature=0)
    whole = server.client.completions.create(prompt=PROMPTS[1], **kw)
    text, finish, use = streamed(server.client.completions.create(
        prompt=PROMPTS[1], stream=True, stream_options={"include_usage": True}, **kw))
    assert (text, finish, use) == (whole.choices[0].text, whole.choices[0].finish_reason,
                                   whole.usage)

    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
    ids = chat_ids(tok, messages)
    ref_text, ref = reference(files, tok, ids, 20, "a1")
    chat = server.client.chat.completions.create(messages=messages, **kw)
    assert chat.choices[0].message.content == ref_text
    assert chat.choices[0].message.role == "assistant"
    assert (chat.usage.prompt_tokens, chat.usage.completion_tokens) == (len(ids), len(ref))
    stream = server.client.chat.completions.create(messages=messages, stream=True, **kw)
    assert streamed(stream) == (ref_text, finish_of(ref, 20), None)  # no usage unless asked
    # max_completion_tokens (chat's newer name) wins over max_tokens
    short = server.client.chat.completions.create(messages=messages, max_completion_tokens=3,
                                                  **kw)
    assert short.usage.completion_tokens == min(3, len(ref))


def test_seeded_sampling_is_reproducible_and_equals_infer(server, files, tok):
    kw = dict(model="tiny", prompt=PROMPTS[2], max_tokens=16, temperature=1.0, top_p=0.9)
    a = server.client.completions.create(seed=7, **kw).choices[0].text
    assert a == server.client.completions.create(seed=7, **kw).choices[0].text
    assert a != server.client.completions.create(seed=8, **kw).choices[0].text
    ids = tok(PROMPTS[2])["input_ids"]
    assert a == reference(files, tok, ids, 16, temperature=1.0, top_p=0.9, seed=7)[0]


def test_stop_strings_cut_the_text_before_them(server, files, tok):
    full = server.client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=40,
                                            temperature=0).choices[0].text
    stop = full[12:15]
    assert stop.strip() and len(full) > 20, full
    want = full[:full.index(stop)]
    kw = dict(model="tiny", prompt=PROMPTS[0], max_tokens=40, temperature=0)
    r = server.client.completions.create(stop=[stop, "never in it \u2603"], **kw)
    assert (r.choices[0].text, r.choices[0].finish_reason) == (want, "stop")
    assert r.usage.completion_tokens < 40
    text, finish, _ = streamed(server.client.completions.create(stop=stop, stream=True, **kw))
    assert (text, finish) == (want, "stop")


def test_text_streamer_holds_back_a_possible_stop_string(tok):
    ids = tok("hello world, this is a tiny model")["input_ids"]
    text = tok.decode(ids)
    pieces = []
    streamer = TextStreamer(tok, pieces.append, stop=("is a tiny", "worlds"))
    for i in ids:
        streamer(i)
        # never sends text that a later token could turn into the start of a stop string
        assert "".join(pieces) in (text[:n] for n in range(len(text) + 1))
        assert "is a" not in "".join(pieces) and not "".join(pieces).endswith("world")
        if streamer.stopped:
            break
    streamer.flush()
    assert "".join(pieces) == streamer.text == text[:text.index("is a tiny")]
    assert streamer.stopped


def _metaspace_tokenizer():
    """SentencePiece-style ("\u2581" marks a space; decode drops the text's first space)."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from tests.tiny_llama import TEXTS
    tok = Tokenizer(models.BPE(byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Sequence([decoders.Metaspace(), decoders.ByteFallback(),
                                     decoders.Fuse()])
    tok.train_from_iterator(TEXTS, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)],
        show_progress=False))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>")


@pytest.mark.parametrize("kind", ["byte-level", "metaspace"])
def test_text_streamer_pieces_join_to_the_whole_decode(tok, kind):
    tokenizer = tok if kind == "byte-level" else _metaspace_tokenizer()
    g = torch.Generator().manual_seed(0)
    for _ in range(100):  # random ids: split UTF-8 sequences, special tokens, spaces
        ids = torch.randint(0, len(tokenizer), (40,), generator=g).tolist()
        pieces = []
        streamer = TextStreamer(tokenizer, pieces.append)
        for i in ids:
            streamer(i)
        streamer.flush()
        assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=True)


def test_eight_concurrent_streams_equal_their_solo_outputs(server):
    kw = dict(max_tokens=24, temperature=0)
    models = ["tiny", "a1", "a2", "tiny", "a1", "a2", "tiny", "a1"]
    solo = [server.client.completions.create(model=m, prompt=p, **kw).choices[0].text
            for m, p in zip(models, PROMPTS)]
    steps_before = server.metric("pyengine_batch_occupancy_count")
    rows_before = server.metric("pyengine_batch_occupancy_sum")
    start = threading.Barrier(8)

    def one(model, prompt):
        start.wait()
        return streamed(server.client.completions.create(model=model, prompt=prompt,
                                                         stream=True, **kw))[0]

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        assert list(pool.map(one, models, PROMPTS)) == solo
    steps = server.metric("pyengine_batch_occupancy_count") - steps_before
    rows = server.metric("pyengine_batch_occupancy_sum") - rows_before
    assert rows / steps > 1.5, "the streams did not share engine steps"


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_disconnects_frees_its_slot(slow, stream):
    aborted = slow.metric('pyengine_finished_requests_total{reason="abort"}')
    if stream:
        chunks = slow.client.completions.create(model="tiny", prompt=PROMPTS[0],
                                                max_tokens=30000, temperature=0, stream=True,
                                                extra_body={"ignore_eos": True})
        for _, _ in zip(range(2), chunks):
            pass
        chunks.close()
    else:  # gives up waiting for the whole reply
        with pytest.raises(httpx.ReadTimeout):
            slow.http.post("/v1/completions", timeout=1.0, json=dict(
                model="tiny", prompt=PROMPTS[0], max_tokens=30000, temperature=0,
                ignore_eos=True))
    slow.wait_health(running=0, waiting=0)
    assert slow.metric('pyengine_finished_requests_total{reason="abort"}') == aborted + 1
    r = slow.client.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=4)
    assert r.usage.completion_tokens >= 1  # the only slot serves again


def test_full_queue_answers_429_and_serves_the_others(slow):
    running = slow.client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=30000,
                                             temperature=0, stream=True,
                                             extra_body={"ignore_eos": True})
    next(iter(running))  # it holds the only slot
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        queued = pool.submit(slow.client.completions.create, model="tiny", prompt=PROMPTS[1],
                             max_tokens=3, temperature=0)
        slow.wait_health(running=1, waiting=1)
        status, err = error_of(slow.http.post("/v1/completions", json=dict(
            model="tiny", prompt="x", max_tokens=2)))
        assert (status, err["type"], err["code"]) == (429, "rate_limit_error", "queue_full")
        with pytest.raises(openai.RateLimitError):
            slow.client.chat.completions.create(model="tiny", messages=[
                {"role": "user", "content": "hi"}], max_tokens=2)
        running.close()
        assert queued.result(timeout=60).usage.completion_tokens >= 1


def test_api_key(slow):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        for path in ("/v1/models", "/health", "/metrics"):
            r = httpx.get(slow.url + path, headers=headers)
            assert error_of(r) == (401, {
                "message": "missing or wrong API key: send 'Authorization: Bearer KEY'",
                "type": "invalid_request_error", "param": None, "code": "invalid_api_key"})
    bad = openai.OpenAI(base_url=slow.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.completions.create(model="tiny", prompt="x", max_tokens=1)
    assert [m.id for m in slow.client.models.list().data] == ["tiny"]


def test_adapters_added_and_removed_at_run_time(server, slow, files, tok):
    r = server.http.post("/v1/adapters", json={"name": "a3", "path": str(files / "a3")})
    assert r.status_code == 201 and r.json()["id"] == "a3"
    assert [m.id for m in server.client.models.list().data] == ["tiny", "a1", "a2", "a3"]
    ids = tok(PROMPTS[3])["input_ids"]
    out = server.client.completions.create(model="a3", prompt=PROMPTS[3], max_tokens=12,
                                           temperature=0).choices[0].text
    assert out == reference(files, tok, ids, 12, "a3")[0]
    assert server.http.delete("/v1/adapters/a3").json() == {"id": "a3", "object": "model",
                                                            "deleted": True}
    assert [m.id for m in server.client.models.list().data] == ["tiny", "a1", "a2"]
    with pytest.raises(openai.NotFoundError):
        server.client.completions.create(model="a3", prompt="x", max_tokens=1)

    # a request running with an adapter finishes with it after the adapter is removed
    assert slow.http.post("/v1/adapters", json={"name": "a3", "path": str(files / "a3")}
                          ).status_code == 201
    stream = slow.client.completions.create(model="a3", prompt=PROMPTS[3], max_tokens=1000,
                                            temperature=0, stream=True,
                                            extra_body={"ignore_eos": True})
    first = next(iter(stream))
    assert slow.http.delete("/v1/adapters/a3").status_code == 200
    status, err = error_of(slow.http.post("/v1/completions", json=dict(model="a3", prompt="x")))
    assert (status, err["code"]) == (404, "model_not_found")
    assert slow.http.get("/health").json()["running"] == 1  # still generating with a3
    text, finish, _ = streamed(stream)
    ref_text, _ = reference(files, tok, ids, 1000, "a3", stop_ids=())
    assert (first.choices[0].text + text, finish) == (ref_text, "length")
    # the engine dropped it once that request ended: the name can be loaded again
    assert slow.http.post("/v1/adapters", json={"name": "a3", "path": str(files / "a3")}
                          ).status_code == 201


def _err(message, param=None, code=None, type="invalid_request_error"):
    return {"message": message, "type": type, "param": param, "code": code}


def test_error_bodies(server, files, tok):
    post = server.http.post
    long_prompt = "the quick brown fox " * 80
    n_long = len(tok(long_prompt)["input_ids"])
    n_hello = len(tok(PROMPTS[0])["input_ids"])
    ok = dict(model="tiny", prompt=PROMPTS[0])
    cases = [
        (post("/v1/completions", content=b'{"model": "tiny", "prompt": ',
              headers={"content-type": "application/json"}),
         400, _err("malformed JSON body: Expecting value (at character 28)")),
        (post("/v1/completions", json=dict(ok, max_tokens="8")),
         400, _err("max_tokens: Input should be a valid integer (got '8')", "max_tokens")),
        (post("/v1/completions", json=dict(ok, temperature="hot")),
         400, _err("temperature: Input should be a valid number (got 'hot')", "temperature")),
        (post("/v1/completions", json=dict(ok, max_tokens=0)),
         400, _err("max_tokens: Input should be greater than or equal to 1 (got 0)", "max_tokens")),
        (post("/v1/completions", json={"model": "tiny"}),
         400, _err("prompt: Field required (got {'model': 'tiny'})", "prompt")),
        (post("/v1/chat/completions", json={"model": "tiny", "messages": [
            {"role": "user", "content": 5}]}),
         400, _err("messages.0.content: Input should be a valid string (got 5)",
                   "messages.0.content")),
        (post("/v1/completions", json=dict(ok, model="nope")),
         404, _err("model 'nope' does not exist; available: tiny, a1, a2", "model",
                   "model_not_found")),
        (post("/v1/completions", json=dict(ok, prompt=long_prompt)),
         400, _err(f"the prompt has {n_long} tokens; this server's context is 256 tokens "
                   "(--max-len), so a prompt may have at most 255", "prompt",
                   "context_length_exceeded")),
        (post("/v1/completions", json=dict(ok, max_tokens=300)),
         400, _err(f"max_tokens=300 is too large: the prompt ({n_hello} tokens) + max_tokens "
                   f"exceeds this server's context of 256 tokens; use max_tokens <= "
                   f"{256 - n_hello}", "max_tokens", "context_length_exceeded")),
        (post("/v1/chat/completions", json={"model": "tiny", "max_completion_tokens": 300,
                                             "messages": [{"role": "user", "content": "hi"}]}),
         400, None),
        (post("/v1/completions", json=dict(ok, prompt="")),
         400, _err("prompt: the prompt is empty (no tokens)", "prompt")),
        (post("/v1/completions", json=dict(ok, prompt=[5, len(tok)])),
         400, _err(f"prompt: token id {len(tok)} is outside the vocabulary [0, {len(tok)})",
                   "prompt")),
        (post("/v1/completions", json=dict(ok, prompt=["a", "b"])),
         400, _err("prompt: give one string (a list of 2 prompts is not supported)", "prompt")),
        (post("/v1/completions", json=dict(ok, n=2)),
         400, _err("n=2 is not supported by this server", "n")),
        (post("/v1/completions", json=dict(ok, echo=True)),
         400, _err("echo=True is not supported by this server", "echo")),
        (post("/v1/completions", json=dict(ok, best_of=3)),
         400, _err("best_of=3 is not supported by this server", "best_of")),
        (post("/v1/chat/completions", json={"model": "tiny", "logprobs": True,
                                             "messages": [{"role": "user", "content": "hi"}]}),
         400, _err("logprobs=True is not supported by this server", "logprobs")),
        (post("/v1/adapters", json={"name": "a1", "path": str(files / "a1")}),
         409, _err("model 'a1' already exists", "name", "adapter_exists")),
        (server.http.delete("/v1/adapters/nope"),
         404, _err("adapter 'nope' does not exist", "name", "model_not_found")),
        (server.http.get("/v1/nothing"), 404, _err("Not Found")),
    ]
    for response, status, body in cases:
        got = error_of(response)
        assert got[0] == status, (response.request.url, got)
        if body is not None:
            assert got[1] == body
    status, err = error_of(post("/v1/chat/completions", json={
        "model": "tiny", "max_completion_tokens": 300,
        "messages": [{"role": "user", "content": "hi"}]}))
    assert (err["param"], err["code"]) == ("max_completion_tokens", "context_length_exceeded")
    status, err = error_of(post("/v1/adapters", json={"name": "bad", "path": str(files)}))
    assert (status, err["param"]) == (400, "path") and "adapter_config.json" in err["message"]
    # the client library raises the matching errors, and the server still serves
    with pytest.raises(openai.BadRequestError):
        server.client.completions.create(model="tiny", prompt=long_prompt, max_tokens=1)
    assert server.client.completions.create(**ok, max_tokens=2).usage.completion_tokens >= 1
    requests = server.metric('pyengine_requests_total{endpoint="/v1/completions",status="400"}')
    assert requests >= 12


# --- in-process: what a subprocess cannot set up -------------------------------------------

@pytest.fixture
def app_client(files, tok):
    """The app over a real BatchDecoder, in this process (fastapi's TestClient runs its
    lifespan, so the engine thread starts and stops with the client)."""
    from fastapi.testclient import TestClient

    from pyengine.infer.batch import BatchDecoder
    from pyengine.serve import create_app

    def make(engine_cls=BatchDecoder, tokenizer=tok):
        engine = engine_cls(load_model(files / "tiny"), slots=2, max_len=64)
        app = create_app(engine, tokenizer, model_name="tiny", max_len=64, max_batch=2,
                         stop_ids={tok.eos_token_id})
        return TestClient(app)
    return make


def test_chat_without_a_template_is_a_400(app_client, files):
    plain = load_tokenizer(str(files / "tiny"))
    plain.chat_template = None
    with app_client(tokenizer=plain) as client:
        r = client.post("/v1/chat/completions", json={"model": "tiny", "messages": [
            {"role": "user", "content": "hi"}]})
        assert error_of(r) == (400, _err("this model's tokenizer has no chat template; use "
                                         "/v1/completions", "messages"))


def test_an_engine_error_ends_that_request_only(app_client, files, tok):
    from pyengine.infer.batch import BatchDecoder
    poison = tok("zzz")["input_ids"][0]

    class Failing(BatchDecoder):
        def step(self, chunks):
            if any(poison in c.tokens for c in chunks):
                raise RuntimeError("poisoned chunk")
            return super().step(chunks)

    with app_client(engine_cls=Failing) as client, concurrent.futures.ThreadPoolExecutor(2) as pool:
        good = pool.submit(client.post, "/v1/completions", json=dict(
            model="tiny", prompt=PROMPTS[0], max_tokens=10, temperature=0))
        bad = pool.submit(client.post, "/v1/completions", json=dict(
            model="tiny", prompt="zzz", max_tokens=10, temperature=0))
        assert error_of(bad.result()) == (500, _err("RuntimeError: poisoned chunk",
                                                    type="server_error"))
        ids = tok(PROMPTS[0])["input_ids"]
        assert good.result().json()["choices"][0]["text"] == reference(files, tok, ids, 10)[0]
        assert client.get("/health").json() == {"status": "ok", "running": 0, "waiting": 0}


def test_cli_errors_exit_2_naming_the_problem(files, tmp_path, capsys):
    from pyengine.serve.__main__ import main
    tiny = str(files / "tiny")
    cases = [
        (["--model", str(tmp_path / "none")], f"error: model directory {tmp_path / 'none'} "
                                              "does not exist\n"),
        (["--model", tiny, "--max-len", "40000"],
         "error: --max-len 40000 exceeds the model's context of 32768 tokens "
         "(max_position_embeddings)\n"),
        (["--model", tiny, "--adapter", "tiny=" + str(files / "a1")],
         "error: --adapter tiny: the base model is served as 'tiny'; pick another NAME (or "
         "--served-name)\n"),
    ]
    for argv, message in cases:
        assert main(argv) == 2
        assert capsys.readouterr().err == message
    assert main(["--model", tiny, "--adapter", f"x={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --adapter x={tmp_path}: ") and "adapter_config.json" in err
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sys.modules, "uvicorn", None)  # as if not installed
        assert main(["--model", tiny]) == 2
        assert capsys.readouterr().err.startswith(
            "error: the server needs the `serve` extra (pip install 'pyengine[serve]'): ")
    for bad in (["--adapter", "a1"], ["--adapter", "a/b=dir"], ["--adapter", "a=x", "--adapter",
                                                                  "a=y"], ["--port", "70000"]):
        with pytest.raises(SystemExit) as e:
            main(["--model", tiny, *bad])
        assert e.value.code == 2
