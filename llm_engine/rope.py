"""Rotary-embedding tables, plain and scaled (linear, dynamic NTK, YaRN, Llama 3, LongRoPE).

Scaling follows HF transformers' ``rope_parameters`` (the ``rope_scaling`` of older
configs): ``{"rope_type": ..., "factor": ..., ...}``. Every variant changes the inverse
frequencies and, for YaRN and LongRoPE, multiplies cos and sin by an attention factor;
the tables then feed :func:`llm_engine.ops.rope_at` like plain RoPE.

Two variants depend on the sequence length in HF, and the tables fix one choice per
position: dynamic NTK rescales the base only past ``max_position_embeddings``, where
the engine never goes, so its tables are the plain ones; LongRoPE uses its short
factors below ``original_max_position_embeddings`` and its long factors from there on
(HF switches every position of a sequence to the long factors once it grows past that).
"""

from __future__ import annotations

import math
from typing import Any

import torch

ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3", "longrope")
_REQUIRED = {
    "linear": ("factor",),
    "dynamic": ("factor",),
    "yarn": ("factor", "original_max_position_embeddings"),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor",
               "original_max_position_embeddings"),
    "longrope": ("short_factor", "long_factor", "original_max_position_embeddings"),
}


def check_rope_scaling(scaling: dict[str, Any], head_dim: int) -> None:
    """Raise ``ValueError`` unless ``scaling`` is a rope-scaling dict this module computes."""
    if not isinstance(scaling, dict):
        raise ValueError(f"rope_scaling must be a dict or None, got {type(scaling).__name__}")
    kind = scaling.get("rope_type")
    if kind not in ROPE_TYPES:
        raise ValueError(f"rope_scaling['rope_type'] must be one of {ROPE_TYPES}, got {kind!r}")
    missing = [k for k in _REQUIRED.get(kind, ()) if scaling.get(k) is None]
    if missing:
        raise ValueError(f"rope_scaling of type {kind!r} needs {missing}, got {scaling}")
    if kind == "longrope":
        for key in ("short_factor", "long_factor"):
            if len(scaling[key]) != head_dim // 2:
                raise ValueError(f"rope_scaling[{key!r}] must have head_dim // 2 = {head_dim // 2} "
                                 f"entries, got {len(scaling[key])}")


def _yarn(inv_freq: torch.Tensor, dim: int, base: float, s: dict[str, Any]) -> tuple[torch.Tensor, float]:
    factor, original = float(s["factor"]), int(s["original_max_position_embeddings"])

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention = s.get("attention_factor")
    if attention is None:
        if s.get("mscale") and s.get("mscale_all_dim"):
            attention = mscale(factor, s["mscale"]) / mscale(factor, s["mscale_all_dim"])
        else:
            attention = mscale(factor)

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(s.get("beta_fast") or 32), correction_dim(s.get("beta_slow") or 1)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    extrapolate = 1 - ramp  # 1: keep the frequency, 0: interpolate it by the factor
    return inv_freq / factor * (1 - extrapolate) + inv_freq * extrapolate, float(attention)


def _llama3(inv_freq: torch.Tensor, s: dict[str, Any]) -> torch.Tensor:
    factor, low, high = float(s["factor"]), float(s["low_freq_factor"]), float(s["high_freq_factor"])
    original = float(s["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > original / low, inv_freq / factor, inv_freq)
    smooth = (original / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= original / high) & (wavelen <= original / low)
    return torch.where(medium, smoothed, scaled)


def rope_cos_sin(
    head_dim: int,
    max_positions: int,
    theta: float,
    scaling: dict[str, Any] | None = None,
    device: torch.device | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary tables ``cos, sin: (max_positions, head_dim // 2)`` fp32, scaled as
    ``scaling`` (HF's rope parameters; None for plain RoPE) says."""
    dim = head_dim
    exponents = torch.arange(0, dim, 2, dtype=torch.float64) / dim
    inv_freq = 1.0 / (theta ** exponents)
    kind = (scaling or {}).get("rope_type", "default")
    attention = 1.0
    positions = torch.arange(max_positions, dtype=torch.float64)
    if kind == "linear":
        inv_freq = inv_freq / float(scaling["factor"])
    elif kind == "yarn":
        inv_freq, attention = _yarn(inv_freq, dim, theta, scaling)
    elif kind == "llama3":
        inv_freq = _llama3(inv_freq, scaling)
    elif kind == "longrope":
        original = int(scaling["original_max_position_embeddings"])
        factor = scaling.get("factor") or max_positions / original
        attention = scaling.get("attention_factor")
        if attention is None:
            attention = (1.0 if factor <= 1.0
                         else math.sqrt(1 + math.log(factor) / math.log(original)))
        short = 1.0 / (torch.tensor(scaling["short_factor"], dtype=torch.float64) * theta ** exponents)
        long = 1.0 / (torch.tensor(scaling["long_factor"], dtype=torch.float64) * theta ** exponents)
        angles = positions[:, None] * torch.where(positions[:, None] < original, short, long)
        return _tables(angles, attention, device)
    return _tables(torch.outer(positions, inv_freq), attention, device)


def _tables(angles: torch.Tensor, attention: float, device: torch.device | None
            ) -> tuple[torch.Tensor, torch.Tensor]:
    return ((angles.cos() * attention).float().to(device),
            (angles.sin() * attention).float().to(device))
