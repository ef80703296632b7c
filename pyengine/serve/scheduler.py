"""Continuous batching: one background thread owns the BatchDecoder and runs it step after
step over the sequences in its slots; the asyncio side submits requests and receives text
pieces through each request's asyncio.Queue (loop.call_soon_threadsafe).

Each step: drop cancelled sequences (a client went away), admit waiting requests into free
slots (first come first served), then build the chunks -- every decoding sequence its next
token, prefilling sequences a piece of their prompt within `prefill_chunk` prompt tokens per
step (so a long prompt delays the streams by one chunk at most) -- and run engine.step.
A sequence whose prompt is done samples its next token (pyengine.infer.sample_next, its own
seeded torch.Generator) and stops on an EOS id, a stop string or max_tokens.
Adapter changes run on the same thread between steps. A failing step is retried chunk by
chunk (a chunk rewrites the same cache positions), so one request's error ends that request
only."""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import os
import threading
import time
from dataclasses import dataclass, field

import torch

from pyengine.infer import TextStreamer, sample_next
from pyengine.infer.batch import Chunk

log = logging.getLogger("pyengine")


class QueueFull(Exception):
    pass


class UnknownAdapter(KeyError):
    pass


@dataclass
class Event:
    """What a request's queue receives: a text piece, then one event with `finish`
    ("stop" | "length") or `error`."""
    text: str = ""
    finish: str | None = None
    error: str | None = None


@dataclass(eq=False)
class Sequence:
    prompt: list[int]
    adapter: str | None
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    stop: tuple[str, ...]
    loop: asyncio.AbstractEventLoop
    ignore_eos: bool = False
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: bool = False  # set by the asyncio side; the engine thread drops it next step
    slot: int = -1
    done: int = 0  # tokens of the prompt + output already in the KV cache
    out: list[int] = field(default_factory=list)
    submitted: float = field(default_factory=time.perf_counter)
    last_token: float = 0.0
    streamer: TextStreamer | None = None  # from the first sampled token on
    generator: torch.Generator | None = None

    def send(self, event: Event) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)


class Scheduler:
    """Runs `engine` (a BatchDecoder with `slots` slots) on its own thread."""

    def __init__(self, engine, tokenizer, stop_ids, slots: int, *, prefill_chunk: int = 128,
                 max_queue: int = 64, metrics=None):
        self.engine, self.tokenizer, self.stop_ids = engine, tokenizer, frozenset(stop_ids)
        self.slots, self.prefill_chunk, self.max_queue = slots, prefill_chunk, max_queue
        self.metrics = metrics
        self.adapters = set(engine.adapter_names)  # the names new requests may use
        self._users = collections.Counter()  # adapter -> requests waiting or running with it
        self._retired = set()  # removed adapters the engine keeps until their requests end
        self._waiting: collections.deque[Sequence] = collections.deque()
        self._running: list[Sequence] = []
        self._commands: list[tuple] = []
        self._stopping = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="pyengine-engine", daemon=True)

    # --- the asyncio side -------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join()

    def submit(self, seq: Sequence) -> None:
        with self._cond:
            if seq.adapter is not None and seq.adapter not in self.adapters:
                raise UnknownAdapter(seq.adapter)
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are waiting (--max-queue "
                                f"{self.max_queue}); retry later")
            self._waiting.append(seq)
            self._users[seq.adapter] += 1
            self._cond.notify()

    def cancel(self, seq: Sequence) -> None:
        """Drop `seq` at the next step (its client went away); no-op once it has finished."""
        with self._cond:
            seq.cancelled = True
            self._cond.notify()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def adapter_names(self) -> list[str]:
        """The adapters new requests may use, sorted."""
        with self._cond:
            return sorted(self.adapters)

    def counts(self) -> tuple[int, int]:
        """(running, waiting) sequences."""
        with self._cond:
            return len(self._running), len(self._waiting)

    def call(self, fn, *args) -> concurrent.futures.Future:
        """Run fn(*args) on the engine thread between steps."""
        fut = concurrent.futures.Future()
        with self._cond:
            self._commands.append((fut, fn, args))
            self._cond.notify()
        return fut

    def add_adapter(self, name: str, path: str) -> concurrent.futures.Future:
        def add():
            with self._cond:
                if name in self.adapters:
                    raise ValueError(f"adapter '{name}' already exists")
                if name in self._retired:
                    raise ValueError(f"adapter '{name}' is still being removed (requests "
                                     "running with it); retry later")
            self.engine.add_adapter(name, path)
            with self._cond:
                self.adapters.add(name)
        return self.call(add)

    def remove_adapter(self, name: str) -> None:
        """New requests cannot use `name` from now on; the engine drops it once the requests
        already using it are done."""
        with self._cond:
            self.adapters.remove(name)  # KeyError when unknown
            self._retired.add(name)
            self._cond.notify()

    # --- the engine thread ------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                while not (self._stopping or self._commands or self._waiting or self._running
                           or self._retired - set(self._users)):
                    self._cond.wait()
                if self._stopping:
                    break
                commands, self._commands = self._commands, []
                for queue in (self._waiting, self._running):
                    for seq in [s for s in queue if s.cancelled]:
                        queue.remove(seq)
                        self._finish(seq, None)
                free = sorted(set(range(self.slots)) - {s.slot for s in self._running})
                while free and self._waiting:
                    seq = self._waiting.popleft()
                    seq.slot = free.pop(0)
                    self._running.append(seq)
                self._drop_retired()
            for fut, fn, args in commands:
                if fut.set_running_or_notify_cancel():
                    try:
                        fut.set_result(fn(*args))
                    except Exception as e:  # noqa: BLE001 -- handed to the caller
                        fut.set_exception(e)
            if self._running:
                self._step()

    def _drop_retired(self) -> None:
        for name in self._retired - set(self._users):
            self._retired.discard(name)
            try:
                self.engine.remove_adapter(name)
            except Exception:  # noqa: BLE001 -- the engine thread must go on
                log.exception(f"removing adapter '{name}' failed")

    def _finish(self, seq: Sequence, event: Event | None) -> None:
        """Forget `seq` (lock held or engine thread); send `event` (None: cancelled)."""
        self._users[seq.adapter] -= 1
        if not self._users[seq.adapter]:
            del self._users[seq.adapter]
        reason = "abort" if event is None else (event.finish or "error")
        if self.metrics:
            self.metrics.finished(reason, time.perf_counter() - seq.submitted)
        if event is not None:
            seq.send(event)

    def _chunks(self) -> list[tuple[Sequence, Chunk]]:
        budget, chunks = self.prefill_chunk, []
        for seq in sorted(self._running, key=lambda s: s.done < len(s.prompt)):  # decodes first
            if seq.done >= len(seq.prompt):
                tokens = seq.out[-1:]
            else:
                tokens = seq.prompt[seq.done:seq.done + budget]
                budget -= len(tokens)
                if not tokens:
                    continue
            chunks.append((seq, Chunk(slot=seq.slot, start=seq.done, tokens=tokens,
                                      adapter=seq.adapter)))
        return chunks

    def _step(self) -> None:
        chunks = self._chunks()
        if self.metrics:
            self.metrics.step(len(chunks))
        try:
            results = list(zip(chunks, self.engine.step([c for _, c in chunks])))
        except Exception:  # noqa: BLE001 -- find whose chunk fails; the others go on
            log.exception("engine step failed; retrying its chunks one by one")
            results = []
            for seq, chunk in chunks:
                try:
                    results.append(((seq, chunk), self.engine.step([chunk])[0]))
                except Exception as e:  # noqa: BLE001
                    log.exception("request failed")
                    self._end(seq, Event(error=f"{type(e).__name__}: {e}"))
        for (seq, chunk), logits in results:
            seq.done += len(chunk.tokens)
            if seq.done >= len(seq.prompt):
                try:
                    self._next_token(seq, logits)
                except Exception as e:  # noqa: BLE001 -- e.g. the tokenizer on odd ids
                    log.exception("request failed")
                    self._end(seq, Event(error=f"{type(e).__name__}: {e}"))

    def _end(self, seq: Sequence, event: Event) -> None:
        with self._cond:
            if seq in self._running:
                self._running.remove(seq)
                self._finish(seq, event)

    def _next_token(self, seq: Sequence, logits: torch.Tensor) -> None:
        if not seq.out:
            seq.streamer = TextStreamer(self.tokenizer, lambda piece: seq.send(Event(piece)),
                                        seq.stop)
            if seq.temperature > 0:
                seq.generator = torch.Generator()
                seed = seq.seed if seq.seed is not None else int.from_bytes(os.urandom(8)) >> 1
                seq.generator.manual_seed(seed)
        token = sample_next(logits, seq.temperature, seq.top_p, seq.generator)
        now = time.perf_counter()
        if self.metrics:
            self.metrics.token(now - (seq.last_token or seq.submitted), first=not seq.out)
        seq.last_token = now
        seq.out.append(token)
        if token in self.stop_ids and not seq.ignore_eos:
            seq.streamer.flush()
            finish = "stop"
        else:
            seq.streamer(token)
            finish = "stop" if seq.streamer.stopped else (
                "length" if len(seq.out) >= seq.max_tokens else None)
            if finish == "length":
                seq.streamer.flush()
        if finish:
            self._end(seq, Event(finish=finish))
