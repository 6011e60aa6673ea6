"""The loop: requests in, one scheduled step at a time, tokens and finished requests out.

``Engine`` wires the block manager, scheduler, model runner and sampler together.
``add_request`` validates a prompt and queues it; ``step`` has the scheduler
pick one flat batch, runs it, samples, and hands the tokens back to the
scheduler, which appends them, stops and frees what finished; ``abort`` cancels
a request at any time. :class:`~llm_engine.engine.llm.LLM`
is the user-facing wrapper.
"""

from __future__ import annotations

import itertools
import os
import random
import time
from dataclasses import dataclass

import torch

from llm_engine.engine.config import EngineConfig
from llm_engine.engine.model_runner import ModelRunner
from llm_engine.engine.sampler import Sampler
from llm_engine.engine.scheduler import Scheduler
from llm_engine.engine.sequence import Request, Sequence
from llm_engine.engine.stop_checker import StopChecker
from llm_engine.kv_cache import KVCache
from llm_engine.model import AttentionMetadata, Transformer
from llm_engine.sampling_params import SamplingParams
from llm_engine.tokenizer import Tokenizer

_SEED_MAX = 2**63 - 1
CPU_KV_MEMORY_FRACTION = 0.25  # of the available memory: the KV cache's cap on CPU


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

    Takes an :class:`~llm_engine.engine.config.EngineConfig` (``config``), or its
    fields as keyword arguments (``overrides``, applied on top of ``config``).
    The KV cache's size is decided by :func:`num_kv_blocks`.
    """

    def __init__(self, model: Transformer, tokenizer: Tokenizer,
                 config: EngineConfig | None = None, **overrides) -> None:
        config = (config or EngineConfig()).with_overrides(**overrides)
        context = model.config.max_position_embeddings
        if config.max_model_len is not None and config.max_model_len > context:
            raise ValueError(f"max_model_len = {config.max_model_len} exceeds the model's "
                             f"context of {context} tokens")
        p = next(model.parameters())
        if config.device is not None and torch.device(config.device).type != p.device.type:
            raise ValueError(f"device = {config.device!r}, but the model is on {p.device}")
        if config.dtype is not None and config.dtype != p.dtype:
            raise ValueError(f"dtype = {config.dtype}, but the model's weights are {p.dtype}")
        self.config = config
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_model_len = config.max_model_len or context
        self.block_size = config.block_size
        c = model.config
        self.kv_cache = KVCache(c.num_layers, c.num_kv_heads, c.head_dim, config.block_size,
                                dtype=p.dtype, device=p.device,
                                num_blocks=num_kv_blocks(model, config, self.max_model_len),
                                enable_prefix_caching=config.enable_prefix_caching)
        self.block_manager = self.kv_cache.manager
        windows = [c.layer_window(i) for i in range(c.num_layers)]
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs,
                                   config.max_num_batched_tokens,
                                   StopChecker(tokenizer.eos_token_id, self.max_model_len),
                                   kv_window=None if None in windows else max(windows))
        self.runner = ModelRunner(model, self.kv_cache, config.max_num_seqs, self.max_model_len,
                                  use_cuda_graphs=not config.enforce_eager)
        self.sampler = Sampler()
        self.requests: dict[str, Request] = {}
        self._rng = random.Random(config.seed)
        self._request_ids = itertools.count()
        self._num_steps = 0
        self._prompt_tokens = 0
        self._generated_tokens = 0
        self._busy_s = 0.0

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
        request = Request(request_id, prompt, len(prompt_token_ids), params, seeds,
                          forked=params.n == 1)
        seq = Sequence(self.scheduler.new_seq_id(), request, 0, seeds[0],
                       list(prompt_token_ids), self.tokenizer, incremental=stream)
        request.seqs.append(seq)
        self.requests[request_id] = request
        self.scheduler.add(seq)
        return request

    def abort(self, request_id: str) -> None:
        """Cancel a request: its sequences stop (finish reason ``"abort"``) and their KV
        blocks are freed at once. An unknown or finished request is ignored."""
        request = self.requests.pop(request_id, None)
        if request is not None:
            self.scheduler.abort(request)

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
        logits = self.runner.execute(batch)
        for seq, begin, end in zip(batch.seqs, batch.starts.tolist(), batch.ends.tolist(), strict=True):
            if end - begin > 1 or seq.num_output_tokens == 0:
                self._prompt_tokens += end - begin
        rows, seqs = self.scheduler.complete_step(batch)
        if len(rows) != logits.shape[0]:
            logits = logits[torch.tensor(rows, device=logits.device)]
        tokens, logprobs = self.sampler(logits, seqs)
        now = time.perf_counter()
        touched: dict[str, Request] = {}
        for seq, token, lp in zip(seqs, tokens, logprobs, strict=True):
            self.scheduler.append(seq, token, lp, now)
            touched[seq.request.request_id] = seq.request
        for request in touched.values():
            if request.finished:
                request.metrics.finished_time = now
                self.requests.pop(request.request_id, None)
        self._generated_tokens += len(tokens)
        self._num_steps += 1
        self._busy_s += time.perf_counter() - start
        return list(touched.values())

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


def kv_block_bytes(model: Transformer, block_size: int) -> int:
    """Bytes of one KV block of ``model`` (K and V of ``block_size`` tokens, every layer)."""
    c, p = model.config, next(model.parameters())
    return 2 * c.num_layers * block_size * c.num_kv_heads * c.head_dim * p.element_size()


def num_kv_blocks(model: Transformer, config: EngineConfig, max_model_len: int) -> int:
    """How many KV blocks the engine allocates: the one place that decides.

    ``config.kv_cache_memory`` bytes when given; otherwise enough blocks for
    ``max_num_seqs`` sequences of ``max_model_len`` tokens, capped by the memory:
    on CUDA ``gpu_memory_utilization`` of the device memory minus what the model
    and a profiled forward of ``max_num_batched_tokens`` tokens take, on CPU
    ``CPU_KV_MEMORY_FRACTION`` of the memory available now. Raises ``ValueError``
    when that holds no block.
    """
    per_block = kv_block_bytes(model, config.block_size)
    if config.kv_cache_memory is not None:
        budget = config.kv_cache_memory
        source = f"kv_cache_memory = {budget} bytes"
    else:
        wanted = config.max_num_seqs * -(-max_model_len // config.block_size)
        device = next(model.parameters()).device
        if device.type == "cuda":
            budget = _free_cuda_bytes(model, config, max_model_len)
            source = (f"gpu_memory_utilization = {config.gpu_memory_utilization} of the device "
                      f"leaves {budget} bytes, which")
        else:
            budget = int(_available_cpu_bytes() * CPU_KV_MEMORY_FRACTION)
            source = f"{CPU_KV_MEMORY_FRACTION} of the available memory ({budget} bytes)"
        budget = min(budget, wanted * per_block)
    if budget < per_block:
        raise ValueError(f"{source} holds no KV block ({per_block} bytes each); "
                         f"set kv_cache_memory")
    return budget // per_block


def _available_cpu_bytes() -> int:
    """Memory the system can give without swapping (``MemAvailable``; free pages where
    /proc/meminfo is missing)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _free_cuda_bytes(model: Transformer, config: EngineConfig, max_model_len: int) -> int:
    """``gpu_memory_utilization`` of the device memory minus the peak of a profiled
    forward of ``max_num_batched_tokens`` tokens (weights included)."""
    device = next(model.parameters()).device
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    n_tokens = config.max_num_batched_tokens
    tokens = torch.zeros(n_tokens, dtype=torch.long, device=device)
    chunk = min(n_tokens, max_model_len)
    lengths = [chunk] * (n_tokens // chunk)
    if n_tokens % chunk:
        lengths.append(n_tokens % chunk)
    positions = torch.cat([torch.arange(n, device=device) for n in lengths])
    with torch.inference_mode():
        hidden = model(tokens, positions, AttentionMetadata.for_lengths(lengths, device))
        model.compute_logits(hidden[:config.max_num_seqs])
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    _, total = torch.cuda.mem_get_info(device)
    return max(0, int(total * config.gpu_memory_utilization) - peak)


def _child_seed(seed: int, index: int) -> int:
    """Seed of completion ``index`` of a request seeded with ``seed`` (index 0 keeps it)."""
    if index == 0:
        return seed
    h = (seed * 0x9E3779B97F4A7C15 + index * 0xD1B54A32D192ED03) & ((1 << 64) - 1)
    h = ((h ^ (h >> 31)) * 0xBF58476D1CE4E5B9) & ((1 << 64) - 1)
    return (h ^ (h >> 29)) & _SEED_MAX
