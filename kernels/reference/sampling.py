"""Softmax-sampling in plain PyTorch: the argument checks shared with the Triton kernel
of ``llm_engine.kernels.sampling`` (whose docstring states the filter semantics and the
random-number rule), and the references ``sample_reference`` and
``filtered_probs_reference``."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .._utils import FLOAT_DTYPES, check_tensor

_INT32_MAX = 2**31 - 1
_SEED_MAX = 2**63 - 1


# --------------------------------------------------------------------------------------
# Input validation (shared by the kernel launcher and the references)
# --------------------------------------------------------------------------------------


@dataclass
class _Params:
    """Per-row parameters as ``(batch,)`` tensors on the logits' device."""

    temperature: torch.Tensor  # fp32
    top_k: torch.Tensor  # int32, 0 = off
    top_p: torch.Tensor  # fp32, 1 = off
    min_p: torch.Tensor  # fp32, 0 = off
    seed: torch.Tensor  # int64
    step: torch.Tensor  # int64
    has_top_k: bool
    has_top_p: bool
    has_min_p: bool
    seed_per_row: bool


# Per parameter: the rule a value must satisfy, as a message and a predicate on
# a tensor (True where the value is valid); the predicate also serves scalars.
_RULES = {
    "temperature": ("must be >= 0 (0 = greedy)", lambda v: v >= 0),
    "top_k": ("must be >= 0 (0 = off)", lambda v: v >= 0),
    "top_p": ("must be in (0, 1] (1 = off)", lambda v: (v > 0) & (v <= 1)),
    "min_p": ("must be in [0, 1] (0 = off)", lambda v: (v >= 0) & (v <= 1)),
    "seed": ("must be >= 0", lambda v: v >= 0),
    "step": ("must be >= 0", lambda v: v >= 0),
}


def _row_param(name: str, value: object, default: float, batch: int, device: torch.device,
               integer: bool) -> tuple[torch.Tensor, float | None]:
    """``value`` (scalar or ``(batch,)`` tensor) as a ``(batch,)`` tensor, plus the scalar.

    The second item is the Python value for a scalar (checked here, no device
    sync) and ``None`` for a tensor (checked by the caller, all at once).
    """
    dtype = torch.int64 if integer else torch.float32
    if value is None:
        value = default
    if isinstance(value, torch.Tensor):
        if value.shape != (batch,):
            raise ValueError(f"{name} must be a scalar or a (batch,) = ({batch},) tensor, "
                             f"got shape {tuple(value.shape)}")
        bad_dtype = value.dtype == torch.bool or value.dtype.is_complex
        if bad_dtype or (integer and value.dtype.is_floating_point):
            kind = "an integer" if integer else "a real"
            raise ValueError(f"{name} must have {kind} dtype, got {value.dtype}")
        return value.to(device=device, dtype=dtype), None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number or a (batch,) tensor, got {type(value).__name__}")
    if integer and not float(value).is_integer():
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if integer and not -(2**63) <= value <= _SEED_MAX:
        raise ValueError(f"{name} must fit in int64, got {value!r}")
    message, ok = _RULES[name]
    if not ok(torch.tensor(float(value))):
        raise ValueError(f"{name} {message}, got {value!r}")
    return torch.full((batch,), value, dtype=dtype, device=device), value


def _validate(logits: torch.Tensor, temperature: object, top_k: object, top_p: object,
              min_p: object, seed: object, step: object, *, scan_logits: bool) -> _Params:
    """Check every argument and return the per-row parameters.

    Raises ``ValueError`` naming the argument for non-2-D logits, a negative or
    NaN temperature, ``top_k < 0``, ``top_p`` outside (0, 1], ``min_p`` outside
    [0, 1], a negative seed or step, a parameter tensor of the wrong length and,
    when ``scan_logits``, NaN logits or a row without a finite logit (the
    kernel checks those itself, during its first pass). Scalars are checked
    without touching the device; tensors with one synchronisation.
    """
    check_tensor("logits", logits, dtypes=FLOAT_DTYPES, ndim=2)
    batch, vocab = logits.shape
    if batch == 0 or vocab == 0:
        raise ValueError(f"logits must have at least one row and one column, "
                         f"got shape {tuple(logits.shape)}")
    if seed is None:
        seed = int(torch.randint(0, _SEED_MAX, (1,)).item())
    given = {"temperature": (temperature, 1.0, False), "top_k": (top_k, 0, True),
             "top_p": (top_p, 1.0, False), "min_p": (min_p, 0.0, False),
             "seed": (seed, 0, True), "step": (step, 0, True)}
    values: dict[str, torch.Tensor] = {}
    scalars: dict[str, float | None] = {}
    for name, (value, default, integer) in given.items():
        values[name], scalars[name] = _row_param(name, value, default, batch, logits.device,
                                                 integer)
    checks = {f"{name} {_RULES[name][0]}": ~_RULES[name][1](values[name])
              for name in values if scalars[name] is None}
    if scan_logits:
        checks["logits must not contain NaN"] = torch.isnan(logits).any(dim=1)
        checks["logits must have a finite value in every row"] = ~torch.isfinite(logits).any(dim=1)
    if checks:
        failed = torch.stack(list(checks.values())).cpu()
        for message, row_fail in zip(checks, failed, strict=True):
            if row_fail.any():
                row = int(row_fail.nonzero()[0, 0])
                name = message.split()[0]
                shown = f", got {values[name][row].item()!r}" if name in values else ""
                raise ValueError(f"{message} (row {row}{shown})")
    return _Params(
        temperature=values["temperature"],
        top_k=values["top_k"].clamp(max=_INT32_MAX).to(torch.int32),
        top_p=values["top_p"], min_p=values["min_p"], seed=values["seed"], step=values["step"],
        has_top_k=scalars["top_k"] is None or scalars["top_k"] > 0,
        has_top_p=scalars["top_p"] is None or scalars["top_p"] < 1,
        has_min_p=scalars["min_p"] is None or scalars["min_p"] > 0,
        seed_per_row=scalars["seed"] is None,
    )

# --------------------------------------------------------------------------------------
# References (plain PyTorch)
# --------------------------------------------------------------------------------------


def _filtered_probs(logits: torch.Tensor, params: _Params) -> torch.Tensor:
    x = logits.float()
    greedy = params.temperature[:, None] == 0
    scaled = x / torch.where(greedy, 1.0, params.temperature[:, None])
    # Stable descending sort: ties stay in token-id order.
    sorted_x, order = torch.sort(scaled, dim=-1, descending=True, stable=True)
    probs = torch.softmax(sorted_x, dim=-1)
    rank = torch.arange(x.shape[1], device=x.device)[None, :]
    k = params.top_k.long()[:, None]
    probs = probs * ((k == 0) | (rank < k))
    probs = probs / probs.sum(dim=-1, keepdim=True)
    p = params.top_p[:, None]
    before = torch.cumsum(probs, dim=-1) - probs
    probs = probs * ((p >= 1) | (before < p))
    probs = probs / probs.sum(dim=-1, keepdim=True)
    probs = probs * (probs >= params.min_p[:, None] * probs[:, :1])
    probs = probs / probs.sum(dim=-1, keepdim=True)
    probs = torch.where(greedy, (rank == 0).float(), probs)
    return torch.zeros_like(probs).scatter_(1, order, probs)


def filtered_probs_reference(
    logits: torch.Tensor,
    temperature: float | torch.Tensor,
    top_k: int | torch.Tensor | None = None,
    top_p: float | torch.Tensor | None = None,
    min_p: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """The exact distribution ``sample`` draws from: ``(batch, vocab)`` fp32.

    ``logits: (batch, vocab)`` fp32/fp16/bf16; parameters as in ``sample``.
    Greedy rows (temperature 0) are one-hot at the lowest-id argmax.
    """
    params = _validate(logits, temperature, top_k, top_p, min_p, 0, 0, scan_logits=True)
    return _filtered_probs(logits, params)


def _mix_seed(seed: int, step: int, stream: int) -> int:
    """A 63-bit generator seed from (seed, step, stream) (splitmix64 finaliser)."""
    h = (seed * 0x9E3779B97F4A7C15 + step * 0xBF58476D1CE4E5B9 + stream * 0x94D049BB133111EB)
    h &= (1 << 64) - 1
    for shift, mul in ((30, 0xBF58476D1CE4E5B9), (27, 0x94D049BB133111EB)):
        h = ((h ^ (h >> shift)) * mul) & ((1 << 64) - 1)
    return (h ^ (h >> 31)) & _SEED_MAX


def sample_reference(
    logits: torch.Tensor,
    temperature: float | torch.Tensor,
    top_k: int | torch.Tensor | None = None,
    top_p: float | torch.Tensor | None = None,
    min_p: float | torch.Tensor | None = None,
    seed: int | torch.Tensor | None = None,
    step: int | torch.Tensor = 0,
    return_logprobs: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``sample`` in plain PyTorch: softmax, sort, cumsum, then ``torch.multinomial``.

    Same arguments, semantics and validation as ``sample``. Each row draws with
    its own ``torch.Generator`` seeded from (seed, step, stream), with the same
    stream rule as the kernel, so the same arguments give the same tokens (a
    different random stream from the kernel's: equal in distribution only).
    """
    params = _validate(logits, temperature, top_k, top_p, min_p, seed, step, scan_logits=True)
    probs = _filtered_probs(logits, params)
    seeds, steps = params.seed.tolist(), params.step.tolist()
    tokens = torch.empty(probs.shape[0], dtype=torch.int64, device=probs.device)
    gen = torch.Generator(device=probs.device)
    for row in range(probs.shape[0]):
        stream = 0 if params.seed_per_row else row
        gen.manual_seed(_mix_seed(seeds[row], steps[row], stream))
        tokens[row] = torch.multinomial(probs[row], 1, generator=gen)[0]
    if not return_logprobs:
        return tokens
    logprobs = torch.log_softmax(logits.float(), dim=-1).gather(1, tokens[:, None])[:, 0]
    return tokens, logprobs
