"""One engine loop shared by every HTTP request.

``AsyncEngine`` owns an :class:`~llm_engine.engine.engine.Engine` and one asyncio
task, the loop. Handlers never touch the engine's state: they ``submit``
requests and ``abort`` them through an ``asyncio.Queue`` (the inbox), and the
loop, between two steps, adds and aborts what the inbox holds, runs the next
``Engine.step`` in a worker thread (so the event loop keeps serving while the
model runs), and hands each request's new tokens and text to that request's
own queue as :class:`RequestEvent` s. Concurrent clients thus share continuous
batching; an abort frees the request's KV blocks before the next step.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from llm_engine.engine.engine import Engine
from llm_engine.engine.sequence import Request
from llm_engine.sampling_params import SamplingParams
from llm_engine.server.metrics import ServerMetrics

logger = logging.getLogger("llm_engine.server")


class QueueFull(Exception):
    """The waiting queue holds ``max_waiting`` requests already (HTTP 503)."""


class EngineStopped(Exception):
    """The engine loop has stopped (shutting down, or it failed)."""


@dataclass
class SeqDelta:
    """What one completion (``index`` within its request) produced since the last event.

    ``text`` is the newly released text (a tail that may start a stop string, or a
    character still split over tokens, is held back until it is settled); ``token_ids``
    and ``logprobs`` are the new tokens and their ``{token_id: logprob}`` dicts.
    """

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[dict[int, float]] | None
    finish_reason: str | None = None
    stop_reason: str | int | None = None


@dataclass
class RequestEvent:
    """New output of one request; ``tag`` is what ``submit`` was given (the prompt's
    place in a batch). ``error`` is set when the engine failed; the request is over."""

    tag: int
    deltas: list[SeqDelta]
    finished: bool
    num_prompt_tokens: int
    num_cached_tokens: int = 0
    error: str | None = None


@dataclass
class _Live:
    """The loop's record of a request it is serving."""

    sink: asyncio.Queue
    tag: int
    arrival: float
    num_prompt_tokens: int
    n: int
    sent: dict[int, int] = field(default_factory=dict)  # seq index -> tokens handed out
    done: set[int] = field(default_factory=set)  # seq indices whose finish was handed out
    last_token: dict[int, float] = field(default_factory=dict)
    first_token: bool = True


class AsyncEngine:
    """The engine behind an asyncio front.

    ``max_waiting``: most requests accepted but not yet scheduled; ``submit`` raises
    :class:`QueueFull` beyond it. ``metrics``: where token counts, latencies and the
    engine's gauges are recorded.
    """

    def __init__(self, engine: Engine, *, max_waiting: int = 256,
                 metrics: ServerMetrics | None = None) -> None:
        if isinstance(max_waiting, bool) or not isinstance(max_waiting, int) or max_waiting < 0:
            raise ValueError(f"max_waiting must be a non-negative int, got {max_waiting!r}")
        self.engine = engine
        self.max_waiting = max_waiting
        self.metrics = metrics
        self._inbox: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._live: dict[str, _Live] = {}
        self._unscheduled: set[str] = set()
        self._pending_adds = 0
        self._ids = itertools.count()
        self._stopping = False
        self._preemptions_seen = 0

    # -- lifecycle ------------------------------------------------------------------
    async def start(self) -> None:
        """Start the loop on the running event loop."""
        self._inbox = asyncio.Queue()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="llm-engine-step")
        self._stopping = False
        self._task = asyncio.create_task(self._loop(), name="llm-engine-loop")
        self._snapshot()

    async def shutdown(self) -> None:
        """Abort what is still in flight (its clients get ``finish_reason="abort"``) and
        stop the loop."""
        if self._task is None:
            return
        self._stopping = True
        self._inbox.put_nowait(("stop",))
        try:
            await self._task
        finally:
            self._task = None
            self._executor.shutdown(wait=True)

    @property
    def alive(self) -> bool:
        return self._task is not None and not self._task.done() and not self._stopping

    @property
    def num_waiting(self) -> int:
        """Requests accepted and not yet scheduled (in the inbox or the engine's queue)."""
        return self._pending_adds + len(self._unscheduled)

    @property
    def idle(self) -> bool:
        """No request in flight and every command handled."""
        return not self._live and self._pending_adds == 0 and self._inbox.empty() \
            and not self.engine.has_unfinished()

    # -- requests -------------------------------------------------------------------
    def room_for(self, count: int) -> bool:
        """Whether ``count`` more requests fit in the waiting queue."""
        return self.num_waiting + count <= self.max_waiting

    def submit(self, prompt: str | None, prompt_token_ids: list[int], params: SamplingParams,
               sink: asyncio.Queue, tag: int = 0) -> str:
        """Queue a request (already checked with ``Engine.check_request``); its events go
        to ``sink``. Returns its request id. Raises :class:`QueueFull`,
        :class:`EngineStopped`."""
        if not self.alive:
            raise EngineStopped("the engine is not running")
        if not self.room_for(1):
            raise QueueFull(f"the waiting queue is full ({self.max_waiting} requests)")
        request_id = f"req-{next(self._ids)}"
        self._pending_adds += 1
        self._inbox.put_nowait(("add", request_id, prompt, list(prompt_token_ids), params,
                                sink, tag, time.perf_counter()))
        return request_id

    def abort(self, request_id: str) -> None:
        """Cancel a request; its blocks are freed before the engine's next step."""
        if self._inbox is not None:
            self._inbox.put_nowait(("abort", request_id))

    # -- the loop -------------------------------------------------------------------
    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self.engine.has_unfinished():
                self._snapshot()
                if self._handle(await self._inbox.get()):
                    break
            stop = False
            while not self._inbox.empty():
                stop = self._handle(self._inbox.get_nowait()) or stop
            if stop:
                break
            if not self.engine.has_unfinished():
                continue
            try:
                # No local keeps the step's requests: they must die with their last event.
                self._publish(await loop.run_in_executor(self._executor, self.engine.step))
            except Exception:  # the engine failed: fail its requests, keep serving
                logger.exception("engine step failed; aborting the requests in flight")
                self._fail_all("the engine failed while running this request")
                continue
            self._snapshot()
        self._abort_all()
        self._snapshot()

    def _handle(self, command: tuple) -> bool:
        """Carry out one inbox command; True for ``stop``."""
        kind = command[0]
        if kind == "stop":
            return True
        if kind == "abort":
            request_id = command[1]
            live = self._live.pop(request_id, None)
            if live is not None:
                self.engine.abort(request_id)
                self._unscheduled.discard(request_id)
                if self.metrics is not None:
                    self.metrics.finished.labels("abort").inc()
            return False
        _, request_id, prompt, ids, params, sink, tag, arrival = command
        self._pending_adds -= 1
        if self._stopping:
            sink.put_nowait(RequestEvent(tag, [], True, len(ids), error="the server is "
                                                                          "shutting down"))
            return False
        try:
            self.engine.add_request(prompt, ids, params, request_id=request_id, stream=True)
        except (ValueError, TypeError) as e:
            sink.put_nowait(RequestEvent(tag, [], True, len(ids), error=str(e)))
            return False
        self._live[request_id] = _Live(sink, tag, arrival, len(ids), params.n)
        self._unscheduled.add(request_id)
        if self.metrics is not None:
            self.metrics.prompt_tokens.inc(len(ids))
        return False

    def _publish(self, touched: list[Request]) -> None:
        now = time.perf_counter()
        m = self.metrics
        for request in touched:
            live = self._live.get(request.request_id)
            if live is None:
                continue
            deltas: list[SeqDelta] = []
            for seq in request.seqs:
                if seq.index in live.done:
                    continue
                sent = live.sent.get(seq.index, 0)
                new = seq.token_ids[seq.num_prompt_tokens + sent:]
                text = seq.detokenizer.stream_delta(seq.is_finished)
                if not new and not text and not seq.is_finished:
                    continue
                logprobs = None if seq.logprobs is None else seq.logprobs[sent:sent + len(new)]
                delta = SeqDelta(seq.index, text, new, logprobs)
                if seq.is_finished:
                    delta.finish_reason, delta.stop_reason = seq.finish_reason, seq.stop_reason
                    live.done.add(seq.index)
                live.sent[seq.index] = sent + len(new)
                deltas.append(delta)
                if new and m is not None:
                    m.generation_tokens.inc(len(new))
                    if live.first_token:
                        live.first_token = False
                        m.ttft.observe(now - live.arrival)
                    elif seq.index in live.last_token:
                        m.itl.observe(now - live.last_token[seq.index])
                if new:
                    live.last_token[seq.index] = now
            finished = request.finished
            if finished:
                del self._live[request.request_id]
                self._unscheduled.discard(request.request_id)
                if m is not None:
                    m.e2e.observe(now - live.arrival)
                    for seq in request.seqs:
                        m.finished.labels(seq.finish_reason or "abort").inc()
            live.sink.put_nowait(RequestEvent(live.tag, deltas, finished, live.num_prompt_tokens,
                                              request.num_cached_tokens))
        for request_id in list(self._unscheduled):
            request = self.engine.requests.get(request_id)
            if request is None or request.metrics.first_scheduled_time is not None:
                self._unscheduled.discard(request_id)

    def _fail_all(self, message: str) -> None:
        for request_id, live in list(self._live.items()):
            self.engine.abort(request_id)
            live.sink.put_nowait(RequestEvent(live.tag, [], True, live.num_prompt_tokens,
                                              error=message))
        self._live.clear()
        self._unscheduled.clear()

    def _abort_all(self) -> None:
        """At shutdown: every request in flight ends with ``finish_reason="abort"``."""
        while not self._inbox.empty():
            command = self._inbox.get_nowait()
            if command[0] == "add":
                self._pending_adds -= 1
                command[5].put_nowait(RequestEvent(command[6], [], True, len(command[3]),
                                                   error="the server is shutting down"))
        for request_id, live in list(self._live.items()):
            self.engine.abort(request_id)
            deltas = [SeqDelta(i, "", [], None, "abort") for i in range(live.n)
                      if i not in live.done]
            live.sink.put_nowait(RequestEvent(live.tag, deltas, True, live.num_prompt_tokens))
            if self.metrics is not None:
                self.metrics.finished.labels("abort").inc()
        self._live.clear()
        self._unscheduled.clear()

    def _snapshot(self) -> None:
        """Copy the engine's gauges into the metrics (only the loop reads the engine)."""
        m = self.metrics
        if m is None:
            return
        stats = self.engine.stats()
        scheduler = self.engine.scheduler
        running = len({id(seq.request) for seq in scheduler.running})
        m.running.set(running)
        m.waiting.set(len(self.engine.requests) - running + self._pending_adds)
        m.running_seqs.set(len(scheduler.running))
        m.waiting_seqs.set(len(scheduler.waiting))
        m.kv_usage.set(stats.kv_usage)
        m.prefix_hit_rate.set(stats.prefix_cache_hit_rate)
        if stats.num_preemptions > self._preemptions_seen:
            m.preemptions.inc(stats.num_preemptions - self._preemptions_seen)
            self._preemptions_seen = stats.num_preemptions
