"""The one place that chooses an implementation for every op the model uses.

Triton kernels run on CUDA tensors; the plain-PyTorch references run on CPU
tensors. ``LLM_ENGINE_BACKEND=torch|triton`` overrides the choice (tests set
``triton`` together with ``TRITON_INTERPRET=1`` to run the real kernels on CPU).
The model calls only these functions and never branches on device itself.
"""

from __future__ import annotations

import importlib
import os

import torch

# Modules, not names: ``llm_engine.kernels`` re-exports functions that share their
# module's name (``layer_norm``, ``paged_attention``), so attribute import is ambiguous.
_attention = importlib.import_module("llm_engine.kernels.attention")
_cross_entropy = importlib.import_module("llm_engine.kernels.cross_entropy")
_layer_norm = importlib.import_module("llm_engine.kernels.layer_norm")
_paged = importlib.import_module("llm_engine.kernels.paged_attention")
_sampling = importlib.import_module("llm_engine.kernels.sampling")

BACKENDS = ("torch", "triton")


def backend_for(t: torch.Tensor) -> str:
    """``"triton"`` or ``"torch"`` for an op whose main input is ``t``."""
    forced = os.environ.get("LLM_ENGINE_BACKEND", "")
    if forced:
        if forced not in BACKENDS:
            raise ValueError(f"LLM_ENGINE_BACKEND must be one of {BACKENDS}, got {forced!r}")
        return forced
    return "triton" if t.is_cuda else "torch"


def _triton(t: torch.Tensor) -> bool:
    return backend_for(t) == "triton"


def layer_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    eps: float,
    residual: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """LayerNorm over the last dim; with ``residual``: ``(norm(x + residual), x + residual)``."""
    fn = _layer_norm.layer_norm if _triton(x) else _layer_norm.layer_norm_reference
    return fn(x, weight, bias, eps=eps, residual=residual)


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm over the last dim; with ``residual``: ``(norm(x + residual), x + residual)``."""
    fn = _layer_norm.rms_norm if _triton(x) else _layer_norm.rms_norm_reference
    return fn(x, weight, eps=eps, residual=residual)


def attention_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    causal: bool = True,
    softmax_scale: float | None = None,
) -> torch.Tensor:
    """Attention over packed sequences: ``q (total_q, heads, d)``, ``k, v (total_k, kv_heads, d)``."""
    fn = (_attention.flash_attention_varlen if _triton(q)
          else _attention.attention_varlen_reference)
    return fn(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
              causal=causal, softmax_scale=softmax_scale)


def store_kv_cache(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Write each token's K/V ``(tokens, kv_heads, d)`` into its cache slot (−1: skip)."""
    fn = _paged.store_kv_cache if _triton(k) else _paged.store_kv_cache_reference
    fn(k, v, k_cache, v_cache, slot_mapping)


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    softmax_scale: float | None = None,
) -> torch.Tensor:
    """Decode attention: one query ``(seqs, heads, d)`` per sequence over its paged cache."""
    fn = _paged.paged_attention if _triton(q) else _paged.paged_attention_reference
    return fn(q, k_cache, v_cache, block_tables, context_lens, softmax_scale=softmax_scale)


def paged_prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    context_lens: torch.Tensor,
    max_seqlen_q: int,
    softmax_scale: float | None = None,
) -> torch.Tensor:
    """New tokens ``(total_q, heads, d)`` attending causally over cached + new K/V."""
    fn = (_paged.paged_prefill_attention if _triton(q)
          else _paged.paged_prefill_attention_reference)
    return fn(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, max_seqlen_q,
              softmax_scale=softmax_scale)


def sample(
    logits: torch.Tensor,
    temperature: float | torch.Tensor,
    top_k: int | torch.Tensor | None = None,
    top_p: float | torch.Tensor | None = None,
    min_p: float | torch.Tensor | None = None,
    seed: int | torch.Tensor | None = None,
    step: int | torch.Tensor = 0,
    return_logprobs: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Sample one token per row of ``logits (batch, vocab)``; see ``kernels.sampling.sample``."""
    fn = _sampling.sample if _triton(logits) else _sampling.sample_reference
    return fn(logits, temperature, top_k=top_k, top_p=top_p, min_p=min_p, seed=seed, step=step,
              return_logprobs=return_logprobs)


def cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Mean cross-entropy of ``hidden (T, H) @ weight (V, H).T`` against ``targets (T,)``.

    Chunked over tokens so the full ``(T, V)`` fp32 logits never exist at once.
    """
    fn = (_cross_entropy.fused_linear_cross_entropy if _triton(hidden)
          else _cross_entropy.fused_linear_cross_entropy_reference)
    return fn(hidden, weight, targets, ignore_index=ignore_index)


def rope_cos_sin(
    head_dim: int, max_positions: int, theta: float, device: torch.device | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary tables ``cos, sin: (max_positions, head_dim // 2)`` fp32."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    angles = torch.outer(torch.arange(max_positions, dtype=torch.float64), inv_freq)
    return angles.cos().float().to(device), angles.sin().float().to(device)


def apply_rope(
    x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> torch.Tensor:
    """Rotate ``x (tokens, heads, head_dim)`` by its ``positions (tokens,)`` (half-split layout).

    The first and second halves of the head dimension form the (real, imaginary)
    pairs, as in HF Llama. Computed in fp32, returned in ``x``'s dtype.
    """
    c = cos[positions].unsqueeze(1)
    s = sin[positions].unsqueeze(1)
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(x.dtype)
