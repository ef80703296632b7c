"""The OpenAI wire format the server speaks: pydantic request models (strict types, so a
string where a number belongs is a 400 naming the field), the response objects, and the
OpenAI-style error."""
from __future__ import annotations

import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class APIError(Exception):
    """An error answered as {"error": {"message", "type", "param", "code"}} with `status`."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = (status, message, param,
                                                                       code, type)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampling(_Strict):
    """Fields both endpoints share (OpenAI's defaults)."""
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    ignore_eos: bool = False  # vLLM's extension: generate max_tokens (benchmarks)

    def stop_strings(self) -> list[str]:
        stop = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        return [s for s in stop if s]

    def unsupported(self) -> list[tuple[str, object]]:
        """(field, value) pairs this server cannot honour; each one is a 400."""
        return [("n", self.n)] * (self.n != 1) + [
            (f, v) for f, v in (("presence_penalty", self.presence_penalty),
                                ("frequency_penalty", self.frequency_penalty)) if v]


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int]  # text, [text], or token ids
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None

    def unsupported(self):
        return super().unsupported() + [(f, v) for f, v in (
            ("echo", self.echo), ("logprobs", self.logprobs),
            ("best_of", self.best_of if self.best_of not in (None, 1) else None)) if v]


class ChatMessage(_Strict):
    class TextPart(_Strict):
        type: Literal["text"]
        text: str

    role: str
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False

    def unsupported(self):
        return super().unsupported() + [("logprobs", True)] * self.logprobs


class AdapterRequest(_Strict):
    name: str = Field(pattern=r"^[^/\s]+$")  # DELETE /v1/adapters/{name} must reach it
    path: str = Field(min_length=1)


REQUEST_FIELDS = frozenset(name for cls in (CompletionRequest, ChatRequest, ChatMessage,
                                            ChatMessage.TextPart, StreamOptions, AdapterRequest)
                           for name in cls.model_fields)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def model_card(name: str, created: int) -> dict:
    return {"id": name, "object": "model", "created": created, "owned_by": "pyengine"}


class Reply:
    """Builds the response objects of one request: completion or chat, whole or chunked."""

    def __init__(self, chat: bool, model: str):
        self.chat, self.model = chat, model
        self.id = new_id("chatcmpl" if chat else "cmpl")
        self.created = int(time.time())

    def _object(self, kind: str, choices: list, **extra) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model,
                "choices": choices, **extra}

    def whole(self, text: str, finish_reason: str, use: dict) -> dict:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text},
                      "logprobs": None, "finish_reason": finish_reason}
            return self._object("chat.completion", [choice], usage=use)
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        return self._object("text_completion", [choice], usage=use)

    def chunk(self, text: str | None, finish_reason: str | None = None, *,
              first: bool = False, with_usage: bool = False) -> dict:
        """One stream chunk; `first` (chat) carries the role; with_usage adds "usage": null."""
        extra = {"usage": None} if with_usage else {}
        if self.chat:
            delta = {"role": "assistant", "content": ""} if first else (
                {} if text is None else {"content": text})
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            return self._object("chat.completion.chunk", [choice], **extra)
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        return self._object("text_completion", [choice], **extra)

    def usage_chunk(self, use: dict) -> dict:
        return self._object("chat.completion.chunk" if self.chat else "text_completion", [],
                            usage=use)
