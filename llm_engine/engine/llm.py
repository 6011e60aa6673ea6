"""The user-facing generation API: ``LLM(...).generate / chat / stream`` (vLLM-shaped)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from llm_engine.engine.config import EngineConfig
from llm_engine.engine.engine import Engine, EngineStats
from llm_engine.engine.sequence import Request, RequestOutput
from llm_engine.model import Transformer
from llm_engine.sampling_params import SamplingParams
from llm_engine.tokenizer import Message, Tokenizer, check_unicode

PromptInput = str | list[int]


class LLM:
    """A model, its tokenizer and a continuous-batching engine over a paged KV cache.

    Args:
        model: a built-in model name (``"smollm2"``) or a path (see ``load_model``).
        config: the engine's arguments (:class:`~llm_engine.engine.config.EngineConfig`:
            ``device``, ``dtype``, ``max_num_seqs``, ``max_num_batched_tokens``,
            ``max_model_len``, ``block_size``, ``kv_cache_memory``,
            ``gpu_memory_utilization``, ``enable_prefix_caching``, ``seed``,
            ``enforce_eager``).
        quantization: ``"auto"`` (a GGUF file's weights stay in their quantized types on
            the CPU), ``"none"`` (full precision) or ``"q8_0"`` / ``"q4_0"`` / ``"q4_1"``
            (quantize at load); see ``load_model``.
        **kwargs: any of the config's fields, applied on top of ``config``.
    """

    def __init__(self, model: str = "smollm2", config: EngineConfig | None = None,
                 quantization: str = "auto", **kwargs) -> None:
        from llm_engine.loader import load_model

        config = (config or EngineConfig()).with_overrides(**kwargs)
        module, tokenizer = load_model(model, device=config.device, dtype=config.dtype,
                                       quantization=quantization)
        self._setup(module, tokenizer, config)

    @classmethod
    def from_modules(cls, model: Transformer, tokenizer: Tokenizer,
                     config: EngineConfig | None = None, **kwargs) -> LLM:
        """An LLM over an already built model (e.g. one being trained) and tokenizer;
        ``config`` and ``kwargs`` as for ``LLM`` (``device`` and ``dtype`` are the model's)."""
        llm = cls.__new__(cls)
        llm._setup(model, tokenizer, (config or EngineConfig()).with_overrides(**kwargs))
        return llm

    def _setup(self, model: Transformer, tokenizer: Tokenizer, config: EngineConfig) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.engine = Engine(model, tokenizer, config)
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype

    # -- generation -------------------------------------------------------------------
    def generate(
        self,
        prompts: PromptInput | Sequence[PromptInput],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Complete every prompt; outputs come back in the order of ``prompts``.

        ``prompts``: a string, a list of token ids, or a list of either.
        ``sampling_params``: one for all prompts, or one per prompt (default ``SamplingParams()``).
        """
        batch = _as_prompt_list(prompts)
        return self._run([self._encode(p, add_bos=None) for p in batch], batch,
                         sampling_params, use_tqdm)

    def chat(
        self,
        messages: list[Message] | Sequence[list[Message]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Answer one conversation (a list of ``{"role", "content"}`` dicts) or a list of
        conversations, through the model's chat template."""
        if not isinstance(messages, (list, tuple)) or not messages:
            raise ValueError("messages must be a non-empty list of {'role', 'content'} dicts "
                             "or a list of such conversations")
        conversations = [messages] if isinstance(messages[0], dict) else list(messages)
        texts = [self.tokenizer.apply_chat_template(list(c), add_generation_prompt=True)
                 for c in conversations]
        return self._run([self._encode(t, add_bos=False) for t in texts], texts,
                         sampling_params, use_tqdm)

    def stream(self, prompt: PromptInput,
               sampling_params: SamplingParams | None = None) -> Iterator[str]:
        """Text deltas of one completion as its tokens are produced (``n`` must be 1).

        Concatenated, the deltas equal the final text. A character split over several
        tokens comes out whole; text that could be the start of a stop string is held
        back until it is known not to be one. Closing the iterator early aborts the
        request.
        """
        params = SamplingParams() if sampling_params is None else sampling_params
        if not isinstance(params, SamplingParams):
            raise TypeError(f"sampling_params must be a SamplingParams, got "
                            f"{type(params).__name__}")
        if params.n != 1:
            raise ValueError(f"stream produces one completion: sampling_params.n must be 1, "
                             f"got {params.n}")
        ids = self._encode(prompt, add_bos=None)
        self.engine.check_request(ids, params)
        return self._stream(prompt if isinstance(prompt, str) else None, ids, params)

    def _stream(self, prompt: str | None, ids: list[int],
                params: SamplingParams) -> Iterator[str]:
        request = self.engine.add_request(prompt, ids, params, stream=True)
        seq = request.seqs[0]
        try:
            while not seq.is_finished:
                self.engine.step()
                delta = seq.detokenizer.stream_delta(seq.is_finished)
                if delta:
                    yield delta
            # Text left when another call's steps finished the request.
            delta = seq.detokenizer.stream_delta(finished=True)
            if delta:
                yield delta
        finally:
            if not seq.is_finished:
                self.engine.abort(request.request_id)

    def stats(self) -> EngineStats:
        """Engine counters: tokens/s, KV usage, prefix-cache hit rate, preemptions."""
        return self.engine.stats()

    # -- helpers ------------------------------------------------------------------------
    def _encode(self, prompt: PromptInput, add_bos: bool | None) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt is empty")
            check_unicode(prompt, "prompt")
            return self.tokenizer.encode(prompt, add_bos=add_bos)
        return list(prompt)

    def _run(self, token_ids: list[list[int]], prompts: list, sampling_params,
             use_tqdm: bool) -> list[RequestOutput]:
        params = _as_params_list(sampling_params, len(token_ids))
        for ids, p in zip(token_ids, params, strict=True):
            self.engine.check_request(ids, p)
        requests: list[Request] = []
        try:
            for ids, prompt, p in zip(token_ids, prompts, params, strict=True):
                text = prompt if isinstance(prompt, str) else None
                requests.append(self.engine.add_request(text, ids, p))
            self._drive(requests, use_tqdm)
        finally:
            for r in requests:
                if not r.finished:
                    self.engine.abort(r.request_id)
        return [r.to_output() for r in requests]

    def _drive(self, requests: list[Request], use_tqdm: bool) -> None:
        """Step the engine until every request in ``requests`` has finished."""
        pending = {r.request_id for r in requests}
        bar = None
        if use_tqdm:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(requests), desc="generate", unit="req")
        try:
            while pending:
                for r in self.engine.step():
                    if r.finished and r.request_id in pending:
                        pending.discard(r.request_id)
                        if bar is not None:
                            bar.update(1)
        finally:
            if bar is not None:
                bar.close()


def _as_prompt_list(prompts: object) -> list[PromptInput]:
    if isinstance(prompts, str):
        return [prompts]
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError("prompts must be a string, a list of token ids, or a non-empty list "
                         "of either")
    if all(isinstance(t, int) and not isinstance(t, bool) for t in prompts):
        return [list(prompts)]
    for i, p in enumerate(prompts):
        if not isinstance(p, (str, list, tuple)):
            raise ValueError(f"prompts[{i}] must be a string or a list of token ids, got "
                             f"{type(p).__name__}")
    return list(prompts)


def _as_params_list(params: object, n: int) -> list[SamplingParams]:
    if params is None:
        return [SamplingParams()] * n
    if isinstance(params, SamplingParams):
        return [params] * n
    if isinstance(params, (list, tuple)):
        if len(params) != n:
            raise ValueError(f"sampling_params has {len(params)} entries for {n} prompts")
        for i, p in enumerate(params):
            if not isinstance(p, SamplingParams):
                raise TypeError(f"sampling_params[{i}] must be a SamplingParams, got "
                                f"{type(p).__name__}")
        return list(params)
    raise TypeError(f"sampling_params must be a SamplingParams or a list of them, got "
                    f"{type(params).__name__}")
