"""How one request is sampled and when it stops (vLLM-shaped)."""

from __future__ import annotations

from dataclasses import dataclass, field

_INT64_MAX = 2**63 - 1


@dataclass
class SamplingParams:
    """Sampling and stopping parameters of one request.

    - ``n``: completions per prompt (they share the prompt's KV blocks).
    - ``temperature``: 0 means greedy (argmax); otherwise logits are divided by it.
    - ``top_k`` (0 = off), ``top_p`` (1 = off), ``min_p`` (0 = off): the usual filters.
    - ``max_tokens``: most tokens generated per completion (finish reason ``"length"``).
    - ``stop``: strings that end a completion; the matched string is not in the text.
    - ``stop_token_ids``: token ids that end a completion (the id stays in ``token_ids``).
    - ``ignore_eos``: keep going past the tokenizer's EOS token.
    - ``seed``: makes sampling reproducible: same request, same seed, same tokens,
      alone or batched with other requests.
    - ``logprobs``: if set, return the log-probability of each sampled token and of
      the ``logprobs`` most likely tokens at each step.
    - ``presence_penalty``, ``frequency_penalty`` (over generated tokens, subtracted
      from logits) and ``repetition_penalty`` (over prompt and generated tokens,
      divides positive and multiplies negative logits).
    """

    n: int = 1
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    max_tokens: int = 16
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    seed: int | None = None
    logprobs: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop_strings: tuple[str, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        _check_int("n", self.n, minimum=1)
        _check_number("temperature", self.temperature)
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        _check_int("top_k", self.top_k, minimum=0, maximum=_INT64_MAX)
        _check_number("top_p", self.top_p)
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        _check_number("min_p", self.min_p)
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        _check_int("max_tokens", self.max_tokens, minimum=1)
        if self.seed is not None:
            _check_int("seed", self.seed, minimum=0, maximum=_INT64_MAX)
        if self.logprobs is not None:
            _check_int("logprobs", self.logprobs, minimum=0)
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _check_number(name, value)
            if not -2 <= value <= 2:
                raise ValueError(f"{name} must be in [-2, 2], got {value}")
        _check_number("repetition_penalty", self.repetition_penalty)
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"ignore_eos must be a bool, got {self.ignore_eos!r}")
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        for i, s in enumerate(stop):
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop[{i}] must be a non-empty string, got {s!r}")
        self.stop_strings = tuple(stop)
        for i, t in enumerate(self.stop_token_ids or []):
            if isinstance(t, bool) or not isinstance(t, int) or t < 0:
                raise ValueError(f"stop_token_ids[{i}] must be a non-negative int, got {t!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def has_penalties(self) -> bool:
        return (self.presence_penalty != 0 or self.frequency_penalty != 0
                or self.repetition_penalty != 1)


def _check_int(name: str, value: object, minimum: int, maximum: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum} (it is sampled as a 64-bit int), "
                         f"got {value}")


def _check_number(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise ValueError(f"{name} must be a number, got {value!r}")
