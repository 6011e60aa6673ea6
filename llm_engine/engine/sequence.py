"""Per-request state: the sequences the scheduler moves around and what users get back.

A :class:`Request` holds one prompt and its ``n`` :class:`Sequence` s (completions).
With ``n > 1`` the request starts as one sequence; when its prompt has been
computed it forks into ``n`` that share the prompt's KV blocks.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from llm_engine.engine.detokenizer import IncrementalDetokenizer
from llm_engine.sampling_params import SamplingParams
from llm_engine.tokenizer import Tokenizer


class Status(enum.Enum):
    WAITING = "waiting"  # no KV blocks; (re)computes all its tokens when admitted
    RUNNING = "running"  # holds KV blocks
    FINISHED = "finished"


@dataclass
class CompletionOutput:
    """One completion of a request.

    ``token_ids`` are the generated ids (a stop token id, EOS included, stays in them);
    ``text`` is their decoded text without the stop token or matched stop string.
    ``finish_reason`` is ``"stop"`` (EOS, stop token or stop string), ``"length"``
    (max_tokens or the model's context), ``"abort"`` (cancelled) or None while running;
    ``stop_reason`` is the matched stop string or stop token id (None for EOS). ``logprobs``, when
    requested, holds for each generated token a dict ``{token_id: logprob}`` with the
    sampled token and the ``SamplingParams.logprobs`` most likely ones.
    """

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None
    logprobs: list[dict[int, float]] | None = None
    stop_reason: str | int | None = None


@dataclass
class RequestMetrics:
    """Timestamps (``time.perf_counter`` seconds) and token counts of one request."""

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0

    @property
    def ttft(self) -> float | None:
        """Time to first token, seconds from arrival."""
        if self.first_token_time is None:
            return None
        return self.first_token_time - self.arrival_time

    @property
    def tpot(self) -> float | None:
        """Time per output token after the first, seconds (None with fewer than 2 tokens)."""
        if self.finished_time is None or self.first_token_time is None:
            return None
        longest = self.num_output_tokens
        if longest < 2:
            return None
        return (self.finished_time - self.first_token_time) / (longest - 1)


@dataclass
class RequestOutput:
    """What ``LLM.generate`` returns per prompt (vLLM-shaped)."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    num_cached_tokens: int
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics


class Sequence:
    """One completion: its tokens, how many of them the KV cache holds, and its text.

    ``token_ids`` (prompt then generated tokens) is the one list that holds the
    request's tokens: the request reads its prompt from it, the detokenizer reads
    the generated part. The scheduler moves the sequence between states.
    """

    def __init__(self, seq_id: int, request: Request, index: int, seed: int,
                 token_ids: list[int], tokenizer: Tokenizer, incremental: bool) -> None:
        self.seq_id = seq_id
        self.request = request
        self.index = index
        self.seed = seed
        self.status = Status.WAITING
        self.token_ids = token_ids
        self.num_prompt_tokens = request.num_prompt_tokens
        # Tokens whose K/V is in the cache; the tokens after them are computed next.
        self.num_computed_tokens = 0
        # Tokens the block manager knows about (allocated or appended).
        self.num_allocated_tokens = 0
        self.finish_reason: str | None = None
        self.stop_reason: str | int | None = None
        self.logprobs: list[dict[int, float]] | None = (
            [] if request.params.logprobs is not None else None)
        self.detokenizer = IncrementalDetokenizer(tokenizer, token_ids, self.num_prompt_tokens,
                                                  request.params.stop_strings, incremental)

    @property
    def params(self) -> SamplingParams:
        return self.request.params

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is Status.FINISHED

    def append_token(self, token: int, logprobs: dict[int, float] | None, now: float) -> None:
        """Record a sampled token (and its logprobs, when requested) at time ``now``."""
        self.token_ids.append(token)
        if self.logprobs is not None:
            self.logprobs.append(logprobs)
        if self.request.metrics.first_token_time is None:
            self.request.metrics.first_token_time = now

    def fork(self, seq_id: int, index: int, seed: int) -> Sequence:
        """A sibling completion with the same tokens and cache state (before any sampling)."""
        detok = self.detokenizer
        child = Sequence(seq_id, self.request, index, seed, list(self.token_ids),
                         detok.tokenizer, detok.incremental)
        child.num_computed_tokens = self.num_computed_tokens
        child.num_allocated_tokens = self.num_allocated_tokens
        child.status = self.status
        return child

    def to_output(self) -> CompletionOutput:
        return CompletionOutput(
            index=self.index,
            text=self.detokenizer.text,
            token_ids=self.output_token_ids,
            finish_reason=self.finish_reason,
            logprobs=None if self.logprobs is None else list(self.logprobs),
            stop_reason=self.stop_reason,
        )


@dataclass
class Request:
    """A prompt, its parameters, and the sequences generating its completions."""

    request_id: str
    prompt: str | None
    num_prompt_tokens: int
    params: SamplingParams
    seeds: list[int]
    arrival_time: float = field(default_factory=time.perf_counter)
    seqs: list[Sequence] = field(default_factory=list)
    num_cached_tokens: int = 0
    forked: bool = False
    aborted: bool = False

    def __post_init__(self) -> None:
        self.metrics = RequestMetrics(arrival_time=self.arrival_time,
                                      num_prompt_tokens=self.num_prompt_tokens)

    num_finished_seqs: int = 0

    @property
    def prompt_token_ids(self) -> list[int]:
        """The prompt, read from the first sequence (every sequence starts with it)."""
        return self.seqs[0].token_ids[:self.num_prompt_tokens]

    @property
    def finished(self) -> bool:
        return self.forked and self.num_finished_seqs == len(self.seqs)

    def to_output(self) -> RequestOutput:
        self.metrics.num_output_tokens = max((s.num_output_tokens for s in self.seqs), default=0)
        outputs = sorted((s.to_output() for s in self.seqs), key=lambda o: o.index)
        return RequestOutput(
            request_id=self.request_id,
            prompt=self.prompt,
            prompt_token_ids=self.prompt_token_ids,
            num_cached_tokens=self.num_cached_tokens,
            outputs=outputs,
            finished=self.finished,
            metrics=self.metrics,
        )
