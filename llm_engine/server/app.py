"""The OpenAI-compatible HTTP API over one engine (FastAPI).

``build_app(engine, ...)`` returns an ASGI app serving ``POST /v1/completions``,
``POST /v1/chat/completions`` (both streaming as server-sent events ending in
``data: [DONE]``), ``GET /v1/models``, ``GET /health`` and ``GET /metrics``.
Handlers validate and tokenize; the one engine loop (:class:`AsyncEngine`) does
the rest. A client that goes away has its requests aborted at once. Every error
is answered in OpenAI's JSON shape: 400 for invalid input, 401 for a missing or
wrong API key (when one is set), 404 for an unknown model, 503 when the waiting
queue is full or the server is stopping.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from llm_engine.engine.engine import Engine
from llm_engine.sampling_params import SamplingParams
from llm_engine.server.async_engine import AsyncEngine, EngineStopped, QueueFull, RequestEvent
from llm_engine.server.metrics import ServerMetrics
from llm_engine.server.protocol import (
    UNSUPPORTED,
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
)

_DEFAULT_COMPLETION_TOKENS = 16
_ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics")
_DISCONNECTED = object()


def build_app(engine: Engine, *, served_model_name: str = "llm_engine",
              api_key: str | None = None, max_waiting: int = 256) -> FastAPI:
    """An ASGI app serving ``engine`` under the model name ``served_model_name``.

    ``api_key``: when set, every ``/v1/`` route needs ``Authorization: Bearer <key>``.
    ``max_waiting``: requests accepted but not yet scheduled beyond which new ones
    get a 503. The engine loop starts and stops with the app's lifespan.
    """
    if not isinstance(served_model_name, str) or not served_model_name:
        raise ValueError(f"served_model_name must be a non-empty string, got "
                         f"{served_model_name!r}")
    if api_key is not None and (not isinstance(api_key, str) or not api_key):
        raise ValueError("api_key must be a non-empty string or None")
    metrics = ServerMetrics()
    front = AsyncEngine(engine, max_waiting=max_waiting, metrics=metrics)
    api = _API(front, engine, served_model_name, int(time.time()))

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await front.start()
        try:
            yield
        finally:
            await front.shutdown()

    app = FastAPI(title="llm_engine OpenAI-compatible API", lifespan=lifespan)
    app.state.engine = front
    app.state.metrics = metrics

    @app.exception_handler(APIError)
    async def _api_error(_request: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return _api_error_response(_validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        error = APIError(exc.status_code, str(exc.detail),
                         kind="invalid_request_error" if exc.status_code < 500 else "server_error")
        return JSONResponse(error.body(), status_code=exc.status_code, headers=exc.headers)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await api.completions(body, request)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await api.chat(body, request)

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{
            "id": served_model_name, "object": "model", "created": api.created,
            "owned_by": "llm_engine", "max_model_len": engine.max_model_len}]}

    @app.get("/health")
    async def health() -> JSONResponse:
        if not front.alive:
            return JSONResponse({"status": "stopped"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    app.add_middleware(_Gate, metrics=metrics, api_key=api_key)
    return app


class _Gate:
    """Pure ASGI middleware (it leaves streaming and disconnects alone): checks the API
    key on ``/v1/`` routes and counts responses by endpoint and status."""

    def __init__(self, app, metrics: ServerMetrics, api_key: str | None) -> None:
        self.app = app
        self.metrics = metrics
        self.api_key = api_key

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        endpoint = path if path in _ENDPOINTS else "other"

        async def counted(message) -> None:
            if message["type"] == "http.response.start":
                self.metrics.http_requests.labels(endpoint, str(message["status"])).inc()
            await send(message)

        if self.api_key is not None and path.startswith("/v1/") and not self._authorized(scope):
            error = APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                             kind="authentication_error", code="invalid_api_key")
            await _api_error_response(error)(scope, receive, counted)
            return
        await self.app(scope, receive, counted)

    def _authorized(self, scope) -> bool:
        for name, value in scope.get("headers", []):
            if name == b"authorization":
                scheme, _, token = value.decode("latin-1").partition(" ")
                return scheme.lower() == "bearer" and hmac.compare_digest(
                    token.strip().encode(), self.api_key.encode())
        return False


def _api_error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status)


def _validation_error(exc: RequestValidationError) -> APIError:
    """A 400 naming the first offending field of a body that fails the pydantic model."""
    errors = exc.errors()
    if not errors:
        return APIError(400, "invalid request body")
    err = errors[0]
    kind = err.get("type", "")
    loc = [p for p in err.get("loc", ()) if p != "body"]
    if kind == "json_invalid":
        detail = (err.get("ctx") or {}).get("error", "")
        return APIError(400, f"the request body is not valid JSON: {detail}".rstrip(": "))
    path = _path(loc)
    if not path:
        return APIError(400, "the request body must be a JSON object (Content-Type: application/json)")
    if kind == "extra_forbidden":
        name = str(loc[-1])
        if len(loc) == 1 and name in UNSUPPORTED:
            return APIError(400, f"{name} is not supported by this server", name)
        return APIError(400, f"unknown field {path!r}", path)
    if kind == "missing":
        return APIError(400, f"{path} is required", path)
    # A union (``prompt``, ``stop``) reports one error per member it tried: name them all.
    messages = list(dict.fromkeys(
        e.get("msg", "invalid value") for e in errors
        if _path([p for p in e.get("loc", ()) if p != "body"]) == path))
    return APIError(400, f"{path}: {' or '.join(messages[:4])}", path)


_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "list", "dict", "none"})


def _path(loc: list) -> str:
    """``messages[0].content`` from pydantic's location, leaving out the union member
    tags it inserts (``str``, ``list[int]``, ``TextPart``, ``function-after[...]``)."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part.isidentifier() and part not in _TYPE_TAGS and not part[0].isupper():
            out += f".{part}" if out else part
    return out


@dataclass
class _Choice:
    """One choice of a response being built (or streamed)."""

    index: int
    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    finish_reason: str | None = None
    offset: int = 0  # characters before the next token (completions' text_offset)


class _API:
    """The two generation endpoints; shared by completions and chat."""

    def __init__(self, front: AsyncEngine, engine: Engine, model_name: str,
                 created: int) -> None:
        self.front = front
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.model_name = model_name
        self.created = created

    def _check_model(self, model: str) -> None:
        if model != self.model_name:
            raise APIError(404, f"the model {model!r} does not exist; this server serves "
                                f"{self.model_name!r}", "model", code="model_not_found")

    # -- endpoints ------------------------------------------------------------------
    async def completions(self, body: CompletionRequest, request: Request) -> Response:
        self._check_model(body.model)
        body.check()
        prompts = body.prompts()
        encoded = self._encode_all(prompts)
        params = body.sampling_params(
            body.max_tokens if body.max_tokens is not None else _DEFAULT_COMPLETION_TOKENS,
            body.logprobs)
        for i, ids in enumerate(encoded):
            self._check_request(ids, params, "prompt" if len(encoded) == 1 else f"prompt[{i}]")
        echo = [p if isinstance(p, str) else self.tokenizer.decode(p) for p in prompts] \
            if body.echo else None
        texts = [p if isinstance(p, str) else None for p in prompts]
        return await self._respond("completion", body, request, texts, encoded, params, echo)

    async def chat(self, body: ChatCompletionRequest, request: Request) -> Response:
        self._check_model(body.model)
        body.check()
        try:
            text = self.tokenizer.apply_chat_template(body.conversation(),
                                                      add_generation_prompt=True)
        except ValueError as e:
            raise APIError(400, str(e), "messages") from None
        ids = self.tokenizer.encode(text, add_bos=False)
        limit = body.max_completion_tokens if body.max_completion_tokens is not None \
            else body.max_tokens
        name = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        if limit is None:
            limit = max(1, self.engine.max_model_len - len(ids))
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        try:
            params = body.sampling_params(limit, logprobs)
        except APIError as e:
            if e.param == "max_tokens":
                e.param, e.message = name, e.message.replace("max_tokens", name, 1)
            raise
        self._check_request(ids, params, "messages")
        return await self._respond("chat", body, request, [text], [ids], params, None)

    # -- helpers --------------------------------------------------------------------
    def _encode_all(self, prompts: list[str | list[int]]) -> list[list[int]]:
        return [self.tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompts]

    def _check_request(self, ids: list[int], params: SamplingParams, prompt_name: str) -> None:
        try:
            self.engine.check_request(ids, params)
        except (ValueError, TypeError) as e:
            message = str(e)
            if message.startswith("sampling_params."):
                param = message.removeprefix("sampling_params.").split(" ", 1)[0]
                if param == "logprobs" and prompt_name == "messages":
                    param = "top_logprobs"
                raise APIError(400, message.removeprefix("sampling_params."), param) from None
            if message.startswith("request can never fit"):
                raise APIError(400, message, "max_tokens") from None
            raise APIError(400, f"{prompt_name}: {message}", prompt_name) from None

    async def _respond(self, kind: str, body, request: Request, texts: list[str | None],
                       encoded: list[list[int]], params: SamplingParams,
                       echo: list[str] | None) -> Response:
        if not self.front.room_for(len(encoded)):
            raise APIError(503, f"the server is busy: {self.front.num_waiting} requests are "
                                f"waiting (at most {self.front.max_waiting}); retry later",
                           kind="server_overloaded", code="queue_full")
        sink: asyncio.Queue = asyncio.Queue()
        request_ids: list[str] = []
        try:
            for tag, (text, ids) in enumerate(zip(texts, encoded, strict=True)):
                request_ids.append(self.front.submit(text, ids, params, sink, tag))
        except (QueueFull, EngineStopped) as e:
            for rid in request_ids:
                self.front.abort(rid)
            raise APIError(503, str(e), kind="server_overloaded") from None
        watcher = asyncio.create_task(_watch_disconnect(request, sink))
        stream = _Stream(kind, body, self.model_name, params, self.tokenizer, len(encoded), echo)
        if body.stream:
            return StreamingResponse(self._sse(stream, sink, watcher, request_ids),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        try:
            while stream.remaining:
                event = await sink.get()
                if event is _DISCONNECTED:
                    return Response(status_code=499)
                if event.error is not None:
                    raise APIError(503 if "shutting down" in event.error else 500, event.error,
                                   kind="server_error")
                stream.apply(event)
            return JSONResponse(stream.final())
        finally:
            watcher.cancel()
            if stream.remaining:
                for rid in request_ids:
                    self.front.abort(rid)

    async def _sse(self, stream: _Stream, sink: asyncio.Queue, watcher: asyncio.Task,
                   request_ids: list[str]) -> AsyncIterator[str]:
        try:
            for chunk in stream.opening():
                yield _sse(chunk)
            while stream.remaining:
                event = await sink.get()
                if event is _DISCONNECTED:
                    return
                if event.error is not None:
                    yield _sse(APIError(500, event.error, kind="server_error").body())
                    break
                for chunk in stream.apply(event):
                    yield _sse(chunk)
            if stream.include_usage:
                yield _sse(stream.usage_chunk())
            yield "data: [DONE]\n\n"
        finally:
            watcher.cancel()
            if stream.remaining:
                for rid in request_ids:
                    self.front.abort(rid)


async def _watch_disconnect(request: Request, sink: asyncio.Queue) -> None:
    """Put ``_DISCONNECTED`` into ``sink`` when the client goes away."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            sink.put_nowait(_DISCONNECTED)
            return


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


class _Stream:
    """Turns a request's events into OpenAI chunks (streaming) or one response."""

    def __init__(self, kind: str, body, model: str, params: SamplingParams, tokenizer,
                 num_prompts: int, echo: list[str] | None) -> None:
        self.kind = kind
        self.chat = kind == "chat"
        self.model = model
        self.n = params.n
        self.want_logprobs = params.logprobs is not None
        self.top = params.logprobs or 0
        self.token_ids = body.return_token_ids
        self.include_usage = bool(body.stream_options and body.stream_options.include_usage)
        self.tokenizer = tokenizer
        self.id = f"{'chatcmpl' if self.chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.remaining = num_prompts
        self.prompt_tokens = [0] * num_prompts
        self.choices = [_Choice(i) for i in range(num_prompts * self.n)]
        self.echo = echo
        if echo is not None:
            for c in self.choices:
                c.text.append(echo[c.index // self.n])
                c.offset = len(echo[c.index // self.n])

    # -- building -------------------------------------------------------------------
    def apply(self, event: RequestEvent) -> list[dict]:
        """Fold ``event`` into the choices; return the stream chunks it makes."""
        chunks = []
        if event.finished:
            self.remaining -= 1
        self.prompt_tokens[event.tag] = event.num_prompt_tokens
        for d in event.deltas:
            choice = self.choices[event.tag * self.n + d.index]
            choice.text.append(d.text)
            choice.token_ids += d.token_ids
            entries = self._logprobs(d.token_ids, d.logprobs, choice) if self.want_logprobs \
                else None
            if entries is not None:
                choice.logprobs += entries
            if d.finish_reason is not None:
                choice.finish_reason = d.finish_reason
            if d.text or d.finish_reason is not None or entries or (self.token_ids
                                                                    and d.token_ids):
                chunks.append(self._chunk(choice, d.text, d.token_ids, entries, d.finish_reason))
        return chunks

    def _logprobs(self, token_ids: list[int], logprobs: list[dict[int, float]] | None,
                  choice: _Choice) -> list:
        entries = []
        for token, lps in zip(token_ids, logprobs or [], strict=True):
            top = sorted(lps.items(), key=lambda kv: -kv[1])[:self.top]
            text = self._token_text(token)
            if self.chat:
                entries.append({"token": text, "logprob": lps[token],
                                "bytes": list(text.encode("utf-8")),
                                "top_logprobs": [
                                    {"token": (t := self._token_text(i)), "logprob": lp,
                                     "bytes": list(t.encode("utf-8"))} for i, lp in top]})
            else:
                entries.append((text, lps[token], {self._token_text(i): lp for i, lp in top},
                                choice.offset))
                choice.offset += len(text)
        return entries

    def _token_text(self, token: int) -> str:
        return self.tokenizer.decode([token], skip_special_tokens=False)

    def _logprobs_object(self, entries: list) -> dict:
        if self.chat:
            return {"content": entries}
        return {"tokens": [e[0] for e in entries], "token_logprobs": [e[1] for e in entries],
                "top_logprobs": [e[2] for e in entries], "text_offset": [e[3] for e in entries]}

    def _chunk(self, choice: _Choice, text: str, token_ids: list[int], entries: list | None,
               finish_reason: str | None) -> dict:
        out: dict = {"index": choice.index}
        if self.chat:
            out["delta"] = {"content": text} if text else {}
        else:
            out["text"] = text
        out["logprobs"] = self._logprobs_object(entries) if entries is not None else None
        out["finish_reason"] = finish_reason
        if self.token_ids:
            out["token_ids"] = token_ids
        chunk = {"id": self.id, "object": "chat.completion.chunk" if self.chat
                 else "text_completion", "created": self.created, "model": self.model,
                 "choices": [out]}
        if self.include_usage:
            chunk["usage"] = None
        return chunk

    def opening(self) -> list[dict]:
        """Chunks sent before any token: the assistant role (chat) or the echoed prompt."""
        if self.chat:
            return [self._role_chunk(c) for c in self.choices]
        if self.echo is not None:
            return [self._chunk(c, c.text[0], [], None, None) for c in self.choices]
        return []

    def _role_chunk(self, choice: _Choice) -> dict:
        chunk = {"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                 "model": self.model, "choices": [{"index": choice.index, "delta": {
                     "role": "assistant", "content": ""}, "logprobs": None,
                     "finish_reason": None}]}
        if self.include_usage:
            chunk["usage"] = None
        return chunk

    def usage(self) -> dict:
        prompt = sum(self.prompt_tokens)
        completion = sum(len(c.token_ids) for c in self.choices)
        return {"prompt_tokens": prompt, "completion_tokens": completion,
                "total_tokens": prompt + completion}

    def usage_chunk(self) -> dict:
        return {"id": self.id, "object": "chat.completion.chunk" if self.chat
                else "text_completion", "created": self.created, "model": self.model,
                "choices": [], "usage": self.usage()}

    def final(self) -> dict:
        """The whole (non-streamed) response."""
        choices = []
        for c in self.choices:
            text = "".join(c.text)
            logprobs = self._logprobs_object(c.logprobs) if self.want_logprobs else None
            if self.chat:
                item = {"index": c.index, "message": {"role": "assistant", "content": text},
                        "logprobs": logprobs, "finish_reason": c.finish_reason}
            else:
                item = {"index": c.index, "text": text, "logprobs": logprobs,
                        "finish_reason": c.finish_reason}
            if self.token_ids:
                item["token_ids"] = c.token_ids
            choices.append(item)
        return {"id": self.id, "object": "chat.completion" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": choices,
                "usage": self.usage()}
