"""The loop: requests in, one scheduled step at a time, tokens and finished requests out.

``Engine`` wires the block manager, scheduler, model runner and sampler together.
``add_request`` validates a prompt and queues it; ``step`` schedules one flat
batch, runs it, samples, checks the stop conditions and frees what finished;
``abort`` cancels a request at any time. :class:`~llm_engine.engine.llm.LLM`
is the user-facing wrapper.
"""

from __future__ import annotations

import itertools
import random
import time
from dataclasses import dataclass

import torch

from llm_engine.engine.detokenizer import IncrementalDetokenizer
from llm_engine.engine.model_runner import ModelRunner
from llm_engine.engine.sampler import Sampler
from llm_engine.engine.scheduler import Scheduler
from llm_engine.engine.sequence import Request, Sequence
from llm_engine.kv_cache import KVCache
from llm_engine.model import AttentionMetadata, Transformer
from llm_engine.sampling_params import SamplingParams
from llm_engine.tokenizer import Tokenizer

_SEED_MAX = 2**63 - 1
_CPU_KV_CACHE_BYTES = 1 << 30


@dataclass
class EngineStats:
    """Counters since the engine started.

    ``generation_tokens_per_s`` and ``prompt_tokens_per_s`` divide by the time spent
    inside ``step``; ``kv_usage`` is the fraction of KV blocks held right now;
    ``prefix_cache_hit_rate`` is the fraction of looked-up prompt tokens found cached.
    """

    num_steps: int
    num_prompt_tokens: int  # prompt (and recomputed) tokens run through the model
    num_generated_tokens: int
    busy_time_s: float
    num_preemptions: int
    kv_usage: float
    num_kv_blocks: int
    prefix_cache_hit_rate: float

    @property
    def generation_tokens_per_s(self) -> float:
        return self.num_generated_tokens / self.busy_time_s if self.busy_time_s else 0.0

    @property
    def prompt_tokens_per_s(self) -> float:
        return self.num_prompt_tokens / self.busy_time_s if self.busy_time_s else 0.0


class Engine:
    """Continuous-batching generation over a paged KV cache.

    ``kv_cache_memory`` (bytes) sizes the cache; by default 1 GiB on CPU and, on
    CUDA, ``gpu_memory_utilization`` of the device memory minus what the model and
    a profiled forward of ``max_num_batched_tokens`` tokens take.
    """

    def __init__(
        self,
        model: Transformer,
        tokenizer: Tokenizer,
        *,
        max_num_seqs: int = 256,
        max_num_batched_tokens: int = 8192,
        block_size: int = 16,
        kv_cache_memory: int | None = None,
        gpu_memory_utilization: float = 0.9,
        enable_prefix_caching: bool = True,
        seed: int = 0,
        use_cuda_graphs: bool = True,
    ) -> None:
        for name, value in (("max_num_seqs", max_num_seqs),
                            ("max_num_batched_tokens", max_num_batched_tokens),
                            ("block_size", block_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if max_num_batched_tokens < max_num_seqs:
            raise ValueError(
                f"max_num_batched_tokens ({max_num_batched_tokens}) must be >= max_num_seqs "
                f"({max_num_seqs}): every running sequence decodes one token per step")
        if not 0 < gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got "
                             f"{gpu_memory_utilization}")
        if kv_cache_memory is not None and (not isinstance(kv_cache_memory, int)
                                            or kv_cache_memory <= 0):
            raise ValueError(f"kv_cache_memory must be a positive number of bytes, got "
                             f"{kv_cache_memory!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_model_len = model.config.max_position_embeddings
        self.block_size = block_size
        c, p = model.config, next(model.parameters())
        per_block = (2 * c.num_layers * block_size * c.num_kv_heads * c.head_dim
                     * p.element_size())
        budget = kv_cache_memory or self._default_kv_bytes(model, max_num_batched_tokens,
                                                           gpu_memory_utilization,
                                                           max_num_seqs, per_block)
        if budget < per_block:
            raise ValueError(f"kv_cache_memory = {budget} bytes holds no KV block "
                             f"({per_block} bytes each)")
        self.kv_cache = KVCache(c.num_layers, c.num_kv_heads, c.head_dim, block_size,
                                dtype=p.dtype, device=p.device, memory_bytes=budget,
                                enable_prefix_caching=enable_prefix_caching)
        self.block_manager = self.kv_cache.manager
        self.scheduler = Scheduler(self.block_manager, max_num_seqs, max_num_batched_tokens)
        self.runner = ModelRunner(model, self.kv_cache, max_num_seqs, use_cuda_graphs)
        self.sampler = Sampler()
        self.requests: dict[str, Request] = {}
        self._rng = random.Random(seed)
        self._seq_ids = itertools.count()
        self._request_ids = itertools.count()
        self._num_steps = 0
        self._prompt_tokens = 0
        self._generated_tokens = 0
        self._busy_s = 0.0

    def _default_kv_bytes(self, model: Transformer, max_num_batched_tokens: int,
                          utilization: float, max_num_seqs: int, per_block: int) -> int:
        device = next(model.parameters()).device
        if device.type != "cuda":
            # Enough for every sequence slot at full context, capped at 1 GiB.
            blocks = max_num_seqs * (-(-self.max_model_len // self.block_size))
            return min(_CPU_KV_CACHE_BYTES, blocks * per_block)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        tokens = torch.zeros(max_num_batched_tokens, dtype=torch.long, device=device)
        chunk = min(max_num_batched_tokens, self.max_model_len)
        lengths = [chunk] * (max_num_batched_tokens // chunk)
        if max_num_batched_tokens % chunk:
            lengths.append(max_num_batched_tokens % chunk)
        positions = torch.cat([torch.arange(n, device=device) for n in lengths])
        with torch.inference_mode():
            hidden = model(tokens, positions, AttentionMetadata.for_lengths(lengths, device))
            model.compute_logits(hidden[:max_num_seqs])
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        _, total = torch.cuda.mem_get_info(device)
        return max(0, int(total * utilization) - peak)

    # -- requests ---------------------------------------------------------------------
    def check_request(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raise ``ValueError``/``TypeError`` if the request could never run."""
        if not isinstance(params, SamplingParams):
            raise TypeError(f"sampling_params must be a SamplingParams, got "
                            f"{type(params).__name__}")
        if not prompt_token_ids:
            raise ValueError("prompt is empty: it must have at least one token")
        vocab = self.model.config.vocab_size
        for i, t in enumerate(prompt_token_ids):
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab:
                raise ValueError(f"prompt token ids must be ints in [0, {vocab}), got "
                                 f"{t!r} at index {i}")
        if params.logprobs is not None and params.logprobs > vocab:
            raise ValueError(f"sampling_params.logprobs = {params.logprobs} exceeds the "
                             f"vocabulary size ({vocab})")
        if params.n > self.scheduler.max_num_seqs:
            raise ValueError(f"sampling_params.n = {params.n} exceeds max_num_seqs = "
                             f"{self.scheduler.max_num_seqs}")
        n_prompt = len(prompt_token_ids)
        if n_prompt > self.max_model_len:
            raise ValueError(f"prompt is {n_prompt} tokens, longer than the model's context "
                             f"of {self.max_model_len} tokens")
        longest = min(n_prompt + params.max_tokens, self.max_model_len)
        needed = -(-longest // self.block_size)
        if needed > self.block_manager.num_blocks:
            raise ValueError(
                f"request can never fit: a prompt of {n_prompt} tokens plus max_tokens="
                f"{params.max_tokens} needs {needed} KV blocks, the cache has "
                f"{self.block_manager.num_blocks}; raise kv_cache_memory or lower max_tokens")

    def add_request(self, prompt: str | None, prompt_token_ids: list[int],
                    params: SamplingParams, request_id: str | None = None,
                    stream: bool = False) -> Request:
        """Validate and queue a request (``prompt`` is its text, if it came as text).
        ``stream``: its text will be read while it runs (decode it token by token)."""
        self.check_request(prompt_token_ids, params)
        request_id = str(next(self._request_ids)) if request_id is None else request_id
        if request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        base = params.seed if params.seed is not None else self._rng.randrange(_SEED_MAX)
        seeds = [_child_seed(base, i) for i in range(params.n)]
        request = Request(request_id, prompt, list(prompt_token_ids), params, seeds,
                          forked=params.n == 1)
        detok = IncrementalDetokenizer(self.tokenizer, params.stop_strings, incremental=stream)
        seq = Sequence(next(self._seq_ids), request, 0, seeds[0], detok)
        request.seqs.append(seq)
        self.requests[request_id] = request
        self.scheduler.add(seq)
        return request

    def abort(self, request_id: str) -> None:
        """Cancel a request: its sequences stop and their blocks are freed."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return
        request.aborted = True
        request.forked = True
        for seq in request.seqs:
            if not seq.is_finished:
                self.scheduler.finish(seq)
                seq.finish_reason = "abort"

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    # -- the step -----------------------------------------------------------------------
    def step(self) -> list[Request]:
        """Run one scheduled batch; returns the requests that got new tokens (finished
        requests are removed from the engine)."""
        start = time.perf_counter()
        batch = self.scheduler.schedule()
        if not batch.seqs:
            if self.scheduler.waiting:
                raise RuntimeError("scheduler could not admit any waiting request")
            return []
        for seq in batch.seqs:
            if seq.request.metrics.first_scheduled_time is None:
                seq.request.metrics.first_scheduled_time = start
        logits = self.runner.execute(batch)
        for seq, begin, end in zip(batch.seqs, batch.starts.tolist(), batch.ends.tolist(), strict=True):
            if end - begin > 1 or seq.num_output_tokens == 0:
                self._prompt_tokens += end - begin
            seq.num_computed_tokens = end
        sampling = [s for s, flag in zip(batch.seqs, batch.sample.tolist(), strict=True) if flag]
        rows, seqs = self._expand_forks(sampling)
        if len(rows) != len(sampling):
            logits = logits[torch.tensor(rows, device=logits.device)]
        tokens, logprobs = self.sampler(logits, seqs)
        now = time.perf_counter()
        touched: dict[str, Request] = {}
        for seq, token, lp in zip(seqs, tokens, logprobs, strict=True):
            self._append(seq, token, lp, now)
            touched[seq.request.request_id] = seq.request
        for request in touched.values():
            if request.finished:
                request.metrics.finished_time = now
                self.requests.pop(request.request_id, None)
        self._generated_tokens += len(tokens)
        self._num_steps += 1
        self._busy_s += time.perf_counter() - start
        return list(touched.values())

    def _expand_forks(self, sampling: list[Sequence]) -> tuple[list[int], list[Sequence]]:
        """Fork requests with ``n > 1`` whose prompt just finished: each child samples from
        its parent's logits row. Returns (logits row per sampled sequence, sequences)."""
        rows: list[int] = []
        seqs: list[Sequence] = []
        for i, seq in enumerate(sampling):
            rows.append(i)
            seqs.append(seq)
            request = seq.request
            if request.forked:
                continue
            request.forked = True
            for index in range(1, request.params.n):
                child = seq.fork(next(self._seq_ids), index, request.seeds[index])
                self.block_manager.fork(seq.seq_id, child.seq_id)
                self.scheduler.add_running(child)
                request.seqs.append(child)
                rows.append(i)
                seqs.append(child)
        return rows, seqs

    def _append(self, seq: Sequence, token: int, logprobs: dict[int, float] | None,
                now: float) -> None:
        """Add a sampled token to ``seq`` and finish it if a stop condition holds."""
        request = seq.request
        params = seq.params
        seq.token_ids.append(token)
        if request.metrics.first_token_time is None:
            request.metrics.first_token_time = now
        if seq.logprobs is not None:
            seq.logprobs.append(logprobs)
        if token == self.tokenizer.eos_token_id and not params.ignore_eos:
            seq.finish_reason, seq.stop_reason = "stop", None
        elif params.stop_token_ids and token in params.stop_token_ids:
            seq.finish_reason, seq.stop_reason = "stop", token
        else:
            matched = seq.detokenizer.add_token(token)
            if matched is not None:
                seq.finish_reason, seq.stop_reason = "stop", matched
            elif seq.num_output_tokens >= params.max_tokens or seq.num_tokens >= self.max_model_len:
                seq.finish_reason = "length"
                seq.detokenizer.flush()
        if seq.finish_reason is not None:
            self.scheduler.finish(seq)

    # -- metrics ------------------------------------------------------------------------
    def stats(self) -> EngineStats:
        bm = self.block_manager
        return EngineStats(
            num_steps=self._num_steps,
            num_prompt_tokens=self._prompt_tokens,
            num_generated_tokens=self._generated_tokens,
            busy_time_s=self._busy_s,
            num_preemptions=self.scheduler.num_preemptions,
            kv_usage=bm.usage,
            num_kv_blocks=bm.num_blocks,
            prefix_cache_hit_rate=bm.prefix_hits / bm.prefix_queries if bm.prefix_queries else 0.0,
        )


def _child_seed(seed: int, index: int) -> int:
    """Seed of completion ``index`` of a request seeded with ``seed`` (index 0 keeps it)."""
    if index == 0:
        return seed
    h = (seed * 0x9E3779B97F4A7C15 + index * 0xD1B54A32D192ED03) & ((1 << 64) - 1)
    h = ((h ^ (h >> 31)) * 0xBF58476D1CE4E5B9) & ((1 << 64) - 1)
    return (h ^ (h >> 29)) & _SEED_MAX
