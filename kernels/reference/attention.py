"""Attention in plain PyTorch (fp32 math): the references of the Triton kernels of
``llm_engine.kernels.attention``, with the same arguments and semantics (causal masks
aligned to the bottom right, grouped-query heads, sliding windows)."""

from __future__ import annotations

import math

import torch

from .._utils import check_window

# --------------------------------------------------------------------------- references


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    softmax_scale: float | None = None,
    window: int | None = None,
) -> torch.Tensor:
    """Plain PyTorch attention in fp32 with the same semantics as :func:`flash_attention`.

    ``q: (batch, seqlen_q, heads, head_dim)``, ``k, v: (batch, seqlen_k, kv_heads, head_dim)``;
    scores are materialised, K/V heads repeated for grouped-query attention, rows that
    see no key give zeros. ``window`` (causal only): query ``i`` sees only the keys
    ``j > i + seqlen_k - seqlen_q - window`` besides the causal bound (a sliding window
    of ``window`` keys ending at its own position). Returns q's shape and dtype.
    """
    window = check_window(window, causal)
    heads, kv_heads = q.shape[2], k.shape[2]
    seqlen_q, seqlen_k = q.shape[1], k.shape[1]
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else softmax_scale
    qf = q.float().transpose(1, 2)
    kf = k.float().repeat_interleave(heads // kv_heads, dim=2).transpose(1, 2)
    vf = v.float().repeat_interleave(heads // kv_heads, dim=2).transpose(1, 2)
    scores = (qf @ kf.transpose(-1, -2)) * scale
    if causal:
        rows = torch.arange(seqlen_q, device=q.device)[:, None]
        cols = torch.arange(seqlen_k, device=q.device)[None, :]
        visible = cols <= rows + (seqlen_k - seqlen_q)
        if window is not None:
            visible &= cols > rows + (seqlen_k - seqlen_q) - window
        scores = scores.masked_fill(~visible, torch.finfo(torch.float32).min)
        probs = torch.softmax(scores, dim=-1).masked_fill(~visible, 0.0)
    else:
        probs = torch.softmax(scores, dim=-1)
    return (probs @ vf).transpose(1, 2).to(q.dtype)


def _uniform_length(bounds: list[int]) -> int | None:
    """The common length of the sequences delimited by ``bounds``, or None if they differ."""
    lengths = {b - a for a, b in zip(bounds, bounds[1:], strict=False)}
    return lengths.pop() if len(lengths) == 1 else None


def attention_varlen_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    causal: bool = True,
    softmax_scale: float | None = None,
    window: int | None = None,
) -> torch.Tensor:
    """Plain PyTorch (fp32) version of :func:`flash_attention_varlen`, one sequence at a time.

    ``q: (total_q, heads, head_dim)``, ``k, v: (total_k, kv_heads, head_dim)``, int32
    ``cu_seqlens_*``; ``max_seqlen_*`` are accepted for signature parity. Returns q's
    shape and dtype. Equal-length sequences (training windows) run as one dense batch.
    """
    bounds_q = cu_seqlens_q.tolist()
    bounds_k = cu_seqlens_k.tolist()
    num_seqs = len(bounds_q) - 1
    len_q, len_k = _uniform_length(bounds_q), _uniform_length(bounds_k)
    if num_seqs > 1 and len_q and len_k:
        dense = attention_reference(q.reshape(num_seqs, len_q, *q.shape[1:]),
                                    k.reshape(num_seqs, len_k, *k.shape[1:]),
                                    v.reshape(num_seqs, len_k, *v.shape[1:]), causal, softmax_scale,
                                    window)
        return dense.reshape(q.shape)
    outs = []
    for i in range(len(bounds_q) - 1):
        qs = q[bounds_q[i]:bounds_q[i + 1]].unsqueeze(0)
        ks = k[bounds_k[i]:bounds_k[i + 1]].unsqueeze(0)
        vs = v[bounds_k[i]:bounds_k[i + 1]].unsqueeze(0)
        outs.append(attention_reference(qs, ks, vs, causal, softmax_scale, window).squeeze(0))
    return torch.cat(outs, dim=0) if outs else q.new_empty(q.shape)
