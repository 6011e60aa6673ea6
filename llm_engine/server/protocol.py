"""The OpenAI API's request bodies (pydantic models) and their mapping to ``SamplingParams``.

Models are strict (a string is not a number, a bool is not an int) and forbid
unknown fields, so a typo is a 400 naming the field instead of a silently ignored
option. OpenAI fields this server does not implement (``logit_bias``, ``tools``,
...) get a 400 saying so. Our additions, as in vLLM: ``top_k``, ``min_p``,
``repetition_penalty``, ``ignore_eos``, ``stop_token_ids`` and
``return_token_ids`` (the generated token ids in each choice).
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from llm_engine.sampling_params import SamplingParams
from llm_engine.tokenizer import check_unicode

MAX_LOGPROBS = 20
"""Most alternatives per token that ``logprobs`` / ``top_logprobs`` may ask for."""

UNSUPPORTED = frozenset({
    "logit_bias", "suffix", "best_of", "tools", "tool_choice", "functions", "function_call",
    "parallel_tool_calls", "response_format", "audio", "modalities", "prediction",
    "reasoning_effort", "web_search_options",
})
"""OpenAI request fields this server does not implement (a 400 says so)."""


class APIError(Exception):
    """An error answered in OpenAI's JSON shape: ``{"error": {message, type, param, code}}``."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 kind: str = "invalid_request_error", code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.kind = kind
        self.code = code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param,
                          "code": self.code}}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False


class _Common(_Strict):
    """The sampling and streaming fields both endpoints share."""

    model: str
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    max_tokens: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    return_token_ids: bool = False

    def check(self) -> None:
        """Raise ``APIError`` (400) for what the types alone do not rule out."""
        if self.stream_options is not None and not self.stream:
            raise APIError(400, "stream_options is only allowed when stream is true",
                           "stream_options")
        for name in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty",
                     "repetition_penalty"):
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise APIError(400, f"{name} must be a finite number, got {value}", name)
        stops = [self.stop] if isinstance(self.stop, str) else self.stop or []
        for i, s in enumerate(stops):
            _check_text(s, "stop" if isinstance(self.stop, str) else f"stop[{i}]")

    def sampling_params(self, max_tokens: int, logprobs: int | None) -> SamplingParams:
        """The engine's parameters; a ``ValueError`` from ``SamplingParams`` becomes a 400
        naming the field."""
        kwargs = {name: getattr(self, name) for name in (
            "n", "temperature", "top_p", "top_k", "min_p", "seed", "presence_penalty",
            "frequency_penalty", "repetition_penalty", "stop", "stop_token_ids", "ignore_eos")
            if getattr(self, name) is not None}
        try:
            return SamplingParams(max_tokens=max_tokens, logprobs=logprobs, **kwargs)
        except ValueError as e:
            raise APIError(400, str(e), _field_of(str(e))) from None


class CompletionRequest(_Common):
    """``POST /v1/completions``: ``prompt`` is a string, a list of token ids, or a
    non-empty list of either (a batch; choice ``i * n + j`` is completion ``j`` of
    prompt ``i``)."""

    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = Field(default=None)
    echo: bool = False

    def check(self) -> None:
        super().check()
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise APIError(400, f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs}",
                           "logprobs")

    def prompts(self) -> list[str | list[int]]:
        """The prompts of the request, each a non-empty string or list of token ids."""
        p = self.prompt
        batch: list = [p] if isinstance(p, str) or (p and isinstance(p[0], int)) else list(p)
        if not batch:
            raise APIError(400, "prompt is empty: send a string, token ids, or a list of them",
                           "prompt")
        for i, item in enumerate(batch):
            name = "prompt" if len(batch) == 1 and batch[0] is p else f"prompt[{i}]"
            if not item:
                raise APIError(400, f"{name} is empty", name)
            if isinstance(item, str):
                _check_text(item, name)
        return batch


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_Common):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None

    def check(self) -> None:
        super().check()
        if not self.messages:
            raise APIError(400, "messages is empty: send at least one message", "messages")
        for i, m in enumerate(self.messages):
            _check_text(m.text(), f"messages[{i}].content")
        if self.top_logprobs is not None:
            if not self.logprobs:
                raise APIError(400, "top_logprobs needs logprobs set to true", "top_logprobs")
            if not 0 <= self.top_logprobs <= MAX_LOGPROBS:
                raise APIError(400, f"top_logprobs must be in [0, {MAX_LOGPROBS}], got "
                                    f"{self.top_logprobs}", "top_logprobs")

    def conversation(self) -> list[dict[str, str]]:
        return [{"role": m.role, "content": m.text()} for m in self.messages]


def _check_text(text: str, name: str) -> None:
    try:
        check_unicode(text, name)
    except ValueError as e:
        raise APIError(400, str(e), name) from None


def _field_of(message: str) -> str | None:
    """The field a ``SamplingParams`` error names: its first word (``top_p must be ...``,
    ``stop[1] must be ...``)."""
    word = message.split(" ", 1)[0]
    return word.split("[", 1)[0] if word and word[0].isalpha() else None
