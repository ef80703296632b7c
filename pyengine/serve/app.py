"""The FastAPI app: OpenAI's /v1/models, /v1/completions, /v1/chat/completions (streamed as
server-sent events or whole), run-time adapters (/v1/adapters), /health and /metrics
(Prometheus text from the app's own CollectorRegistry). Every error is an OpenAI-style body
{"error": {"message", "type", "param", "code"}}; with an API key every route (/health and
/metrics too) needs `Authorization: Bearer KEY`."""
from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import secrets
import time

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram,
                               generate_latest)
from starlette.exceptions import HTTPException

from pyengine.infer import ModelLoadError, encode_chat
from pyengine.serve.protocol import (REQUEST_FIELDS, AdapterRequest, APIError, ChatRequest,
                                     CompletionRequest, Reply, model_card, usage)
from pyengine.serve.scheduler import QueueFull, Scheduler, Sequence, UnknownAdapter

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class ServerMetrics:
    """The server's Prometheus metrics, in a registry of its own."""

    def __init__(self, max_batch: int):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("pyengine_requests", "HTTP requests by endpoint and status",
                                ["endpoint", "status"], registry=r)
        self.finished_requests = Counter(
            "pyengine_finished_requests", "generation requests by finish reason "
            "(stop, length, abort = the client went away, error)", ["reason"], registry=r)
        self.prompt_tokens = Counter("pyengine_prompt_tokens", "prompt tokens admitted",
                                     registry=r)
        self.generation_tokens = Counter("pyengine_generation_tokens", "tokens generated",
                                         registry=r)
        self.running = Gauge("pyengine_running_sequences", "sequences in the batch", registry=r)
        self.waiting = Gauge("pyengine_waiting_sequences", "requests queued", registry=r)
        self.batch_occupancy = Histogram("pyengine_batch_occupancy", "sequences per engine step",
                                         buckets=tuple(range(1, max_batch + 1)), registry=r)
        self.ttft = Histogram("pyengine_time_to_first_token_seconds", "request to first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.inter_token = Histogram("pyengine_inter_token_latency_seconds",
                                     "time between a sequence's tokens",
                                     buckets=LATENCY_BUCKETS, registry=r)
        self.latency = Histogram("pyengine_request_latency_seconds", "request to last token",
                                 buckets=LATENCY_BUCKETS, registry=r)

    # called by the scheduler's thread
    def step(self, chunks: int) -> None:
        self.batch_occupancy.observe(chunks)

    def token(self, seconds: float, first: bool) -> None:
        self.generation_tokens.inc()
        (self.ttft if first else self.inter_token).observe(seconds)

    def finished(self, reason: str, seconds: float) -> None:
        self.finished_requests.labels(reason).inc()
        self.latency.observe(seconds)


class _CountRequests:
    """ASGI middleware: counts every response by its route and status."""

    def __init__(self, app, metrics: ServerMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500

        async def send_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = scope.get("route")  # set by the router on this very scope
            self.metrics.requests.labels(route.path if route else "unmatched", str(status)).inc()


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _disconnected(request: Request) -> None:
    """Returns when the client closes the connection (the body is read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _validation_error(exc: RequestValidationError) -> APIError:
    err = exc.errors()[0]
    if err["type"] == "json_invalid":
        return APIError(400, f"malformed JSON body: {err.get('ctx', {}).get('error', err['msg'])}"
                             f" (at character {err['loc'][-1]})")
    path = []  # the field's path up to the first pydantic type tag ("str", "list[str]", ...)
    for part in err["loc"][1:]:
        if not (isinstance(part, int) or part in REQUEST_FIELDS):
            break
        path.append(str(part))
    param = ".".join(path) or None
    got = repr(err.get("input"))
    got = got if len(got) <= 80 else got[:77] + "..."
    return APIError(400, f"{param or 'body'}: {err['msg']} (got {got})", param=param)


def create_app(engine, tokenizer, *, model_name: str, max_len: int, max_batch: int,
               stop_ids=(), prefill_chunk: int = 128, max_queue: int = 64,
               api_key: str | None = None) -> FastAPI:
    """The app serving `engine` (a BatchDecoder with max_batch slots of max_len positions);
    its engine thread runs while the app's lifespan does."""
    metrics = ServerMetrics(max_batch)
    # the engine thread decodes with its own tokenizer: a Rust tokenizer shared between
    # threads fails ("Already borrowed") when one encodes while the other decodes
    scheduler = Scheduler(engine, copy.deepcopy(tokenizer), stop_ids, max_batch,
                          prefill_chunk=prefill_chunk, max_queue=max_queue, metrics=metrics)
    metrics.running.set_function(lambda: scheduler.counts()[0])
    metrics.waiting.set_function(lambda: scheduler.counts()[1])
    created = int(time.time())
    vocab = engine.model.cfg.vocab

    @contextlib.asynccontextmanager
    async def lifespan(app):
        scheduler.start()
        try:
            yield
        finally:
            scheduler.stop()

    async def check_key(request: Request):
        if api_key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(given.encode(),
                                                                     api_key.encode()):
            raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer KEY'",
                           code="invalid_api_key")

    app = FastAPI(title="pyengine", lifespan=lifespan, dependencies=[Depends(check_key)])
    app.state.scheduler, app.state.metrics = scheduler, metrics
    app.add_middleware(_CountRequests, metrics=metrics)

    @app.exception_handler(APIError)
    async def api_error(request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def bad_request(request, exc: RequestValidationError):
        return await api_error(request, _validation_error(exc))

    @app.exception_handler(HTTPException)
    async def http_error(request, exc: HTTPException):
        return await api_error(request, APIError(exc.status_code, str(exc.detail), code=None))

    def resolve_model(name: str) -> str | None:
        """The adapter that `model` names (None: the base), or 404."""
        if name == model_name:
            return None
        names = scheduler.adapter_names()
        if name in names:
            return name
        raise APIError(404, f"model '{name}' does not exist; available: "
                            f"{', '.join([model_name, *names])}",
                       param="model", code="model_not_found")

    def prompt_ids(body) -> tuple[list[int], str]:
        """Token ids of the prompt, and the name of the request field holding it."""
        if isinstance(body, ChatRequest):
            if not getattr(tokenizer, "chat_template", None):
                raise APIError(400, "this model's tokenizer has no chat template; use "
                                    "/v1/completions", param="messages")
            messages = [{"role": m.role, "content": m.text()} for m in body.messages]
            try:
                return encode_chat(tokenizer, messages), "messages"
            except Exception as e:  # noqa: BLE001 -- the template's own checks (jinja)
                raise APIError(400, f"messages: the chat template failed: {e}",
                               param="messages") from None
        prompt = body.prompt
        if prompt and all(isinstance(t, int) for t in prompt):  # token ids
            bad = [t for t in prompt if not 0 <= t < vocab]
            if bad:
                raise APIError(400, f"prompt: token id {bad[0]} is outside the vocabulary "
                                    f"[0, {vocab})", param="prompt")
            return prompt, "prompt"
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise APIError(400, f"prompt: give one string (a list of {len(prompt)} "
                                    "prompts is not supported)", param="prompt")
            prompt = prompt[0]
        return tokenizer(prompt)["input_ids"], "prompt"

    async def generate(body, request: Request):
        if unsupported := body.unsupported():
            name, value = unsupported[0]
            raise APIError(400, f"{name}={value!r} is not supported by this server",
                           param=name)
        adapter = resolve_model(body.model)
        ids, prompt_field = prompt_ids(body)
        chat = isinstance(body, ChatRequest)
        if not ids:
            raise APIError(400, f"{prompt_field}: the prompt is empty (no tokens)",
                           param=prompt_field)
        if len(ids) >= max_len:
            raise APIError(400, f"the prompt has {len(ids)} tokens; this server's context is "
                                f"{max_len} tokens (--max-len), so a prompt may have at most "
                                f"{max_len - 1}", param=prompt_field,
                           code="context_length_exceeded")
        max_tokens = (body.max_completion_tokens or body.max_tokens) if chat else body.max_tokens
        field = "max_completion_tokens" if chat and body.max_completion_tokens else "max_tokens"
        if max_tokens is None:
            max_tokens = max_len - len(ids) if chat else 16
        if len(ids) + max_tokens > max_len:
            raise APIError(400, f"{field}={max_tokens} is too large: the prompt ({len(ids)} "
                                f"tokens) + {field} exceeds this server's context of {max_len} "
                                f"tokens; use {field} <= {max_len - len(ids)}",
                           param=field, code="context_length_exceeded")
        seq = Sequence(prompt=ids, adapter=adapter, max_tokens=max_tokens,
                       temperature=body.temperature, top_p=body.top_p, seed=body.seed,
                       stop=tuple(body.stop_strings()), ignore_eos=body.ignore_eos,
                       loop=asyncio.get_running_loop())
        try:
            scheduler.submit(seq)
        except QueueFull as e:
            raise APIError(429, str(e), type="rate_limit_error", code="queue_full") from None
        except UnknownAdapter:
            resolve_model(body.model)  # removed meanwhile: the 404
        metrics.prompt_tokens.inc(len(ids))
        reply = Reply(chat, body.model)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(stream(seq, reply, include_usage),
                                     media_type="text/event-stream")
        pieces, gone = [], asyncio.ensure_future(_disconnected(request))
        try:
            while True:
                event = asyncio.ensure_future(seq.events.get())
                await asyncio.wait((event, gone), return_when=asyncio.FIRST_COMPLETED)
                if not event.done():  # the client went away: nobody reads a reply
                    event.cancel()
                    return Response(status_code=499)
                event = event.result()
                pieces.append(event.text)
                if event.error:
                    raise APIError(500, event.error, type="server_error")
                if event.finish:
                    return reply.whole("".join(pieces), event.finish,
                                       usage(len(ids), len(seq.out)))
        finally:
            gone.cancel()
            scheduler.cancel(seq)  # no-op when it finished

    async def stream(seq: Sequence, reply: Reply, include_usage: bool):
        try:
            if reply.chat:
                yield _sse(reply.chunk(None, first=True, with_usage=include_usage))
            while True:
                event = await seq.events.get()
                if event.error:
                    yield _sse(APIError(500, event.error, type="server_error").body())
                    break
                if event.text:
                    yield _sse(reply.chunk(event.text, with_usage=include_usage))
                if event.finish:
                    yield _sse(reply.chunk(None, event.finish, with_usage=include_usage))
                    if include_usage:
                        yield _sse(reply.usage_chunk(usage(len(seq.prompt), len(seq.out))))
                    break
            yield "data: [DONE]\n\n"
        finally:  # the client went away (the task is cancelled) or all was sent
            scheduler.cancel(seq)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        return await generate(body, request)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        return await generate(body, request)

    @app.get("/v1/models")
    async def models():
        names = [model_name, *scheduler.adapter_names()]
        return {"object": "list", "data": [model_card(n, created) for n in names]}

    @app.get("/v1/models/{name}")
    async def model(name: str):
        resolve_model(name)
        return model_card(name, created)

    @app.post("/v1/adapters", status_code=201)
    async def add_adapter(body: AdapterRequest):
        if body.name == model_name or body.name in scheduler.adapter_names():
            raise APIError(409, f"model '{body.name}' already exists", param="name",
                           code="adapter_exists")
        try:
            await asyncio.wrap_future(scheduler.add_adapter(body.name, body.path))
        except (ModelLoadError, ValueError, OSError) as e:
            raise APIError(400, f"adapter '{body.name}' from {body.path}: {e}",
                           param="path") from None
        return model_card(body.name, created)

    @app.delete("/v1/adapters/{name}")
    async def remove_adapter(name: str):
        try:
            scheduler.remove_adapter(name)
        except KeyError:
            raise APIError(404, f"adapter '{name}' does not exist", param="name",
                           code="model_not_found") from None
        return {"id": name, "object": "model", "deleted": True}

    @app.get("/health")
    async def health():
        running, waiting = scheduler.counts()
        if not scheduler.alive:
            raise APIError(503, "the engine thread has stopped", type="server_error")
        return {"status": "ok", "running": running, "waiting": waiting}

    @app.get("/metrics")
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
