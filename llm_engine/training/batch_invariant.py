"""Batch-invariant ops: a token's numbers do not depend on what else is in the batch.

The engine decodes a token in a batch of other requests' tokens (one row per sequence,
paged decode attention, oneDNN matmuls of a few rows); the trainer recomputes the same
token in a full-sequence forward (hundreds of rows, SDPA). Their kernels reduce in
different orders, so the log-probs differ in the last bits. Inside :func:`enabled`, the
model's ops run every token through calls of identical shapes whatever the batch:

- linear layers one row at a time (``F.linear`` on a fresh ``(1, in)`` row, the weight
  itself, never the packed copy); RMSNorm / LayerNorm, SwiGLU and RoPE one row at a time;
- attention one query at a time over exactly its own keys, in position order: the
  engine's paged decode and prefill gather the sequence's K/V from the cache blocks,
  the trainer's full forward slices them from the sequence.

Identical shapes take identical code paths, so the engine's sampling log-probs equal
the trainer's recomputed ones bit for bit (tests compare the bits). It costs speed:
every row reads each weight matrix on its own. The switch replaces the functions of
:mod:`llm_engine.ops` for the duration of the ``with`` block (the model looks them up
there on every call) and is not thread-safe.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from llm_engine import ops
from llm_engine.kernels.layer_norm import layer_norm_reference, rms_norm_reference


def _rows(fn, x: torch.Tensor, *rest: torch.Tensor | None) -> torch.Tensor:
    """``fn`` applied to each row of ``x`` (and the same row of each ``rest``) alone."""
    if x.shape[0] == 0:
        return fn(x, *rest)
    return torch.cat([fn(x[i:i + 1].clone(), *(None if r is None else r[i:i + 1].clone()
                                               for r in rest)) for i in range(x.shape[0])])


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           packed: ops.PackedWeight | None = None) -> torch.Tensor:
    """:func:`llm_engine.ops.linear` one row at a time (``packed`` is not used)."""
    del packed
    flat = x.reshape(-1, x.shape[-1])
    out = _rows(lambda r: F.linear(r, weight, bias), flat)
    return out.view(*x.shape[:-1], weight.shape[0])


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None):
    """:func:`llm_engine.ops.rms_norm` one row at a time."""
    flat = x.reshape(-1, x.shape[-1])
    if residual is None:
        return _rows(lambda r: rms_norm_reference(r, weight, eps=eps), flat).view(x.shape)
    res = residual.reshape(-1, x.shape[-1])
    pairs = [rms_norm_reference(flat[i:i + 1].clone(), weight, eps=eps,
                                residual=res[i:i + 1].clone()) for i in range(flat.shape[0])]
    return (torch.cat([p[0] for p in pairs]).view(x.shape),
            torch.cat([p[1] for p in pairs]).view(x.shape))


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float,
               residual: torch.Tensor | None = None):
    """:func:`llm_engine.ops.layer_norm` one row at a time."""
    flat = x.reshape(-1, x.shape[-1])
    if residual is None:
        return _rows(lambda r: layer_norm_reference(r, weight, bias, eps=eps), flat).view(x.shape)
    res = residual.reshape(-1, x.shape[-1])
    pairs = [layer_norm_reference(flat[i:i + 1].clone(), weight, bias, eps=eps,
                                  residual=res[i:i + 1].clone()) for i in range(flat.shape[0])]
    return (torch.cat([p[0] for p in pairs]).view(x.shape),
            torch.cat([p[1] for p in pairs]).view(x.shape))


def silu_mul(h: torch.Tensor) -> torch.Tensor:
    """:func:`llm_engine.ops.silu_mul` one row at a time."""
    flat = h.reshape(-1, h.shape[-1])
    return _rows(ops.silu_mul_reference, flat).view(*h.shape[:-1], h.shape[-1] // 2)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """:func:`llm_engine.ops.apply_rope` one token at a time."""
    return _rows(ops.apply_rope_reference, x, cos, sin)


def _attend_one(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """One query ``q (heads, d)`` over its keys ``k, v (L, kv_heads, d)`` → ``(heads, d)``."""
    group = q.shape[0] // k.shape[1]
    k = k.repeat_interleave(group, dim=1).transpose(0, 1)  # (heads, L, d)
    v = v.repeat_interleave(group, dim=1).transpose(0, 1)
    scores = (q.unsqueeze(1) * k).sum(-1) * scale  # (heads, L)
    p = torch.softmax(scores.float(), dim=-1).to(v.dtype)
    return (p.unsqueeze(-1) * v).sum(1)


def _scale(softmax_scale: float | None, d: int) -> float:
    return softmax_scale if softmax_scale is not None else d ** -0.5


def attention_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, max_seqlen_q: int,
                     max_seqlen_k: int, causal: bool = True,
                     softmax_scale: float | None = None) -> torch.Tensor:
    """Causal self-attention of packed sequences, one query at a time over its keys."""
    if not causal or not torch.equal(cu_seqlens_q.cpu(), cu_seqlens_k.cpu()):
        raise ValueError("batch-invariant attention_varlen covers causal self-attention only "
                         "(cu_seqlens_q == cu_seqlens_k)")
    scale = _scale(softmax_scale, q.shape[-1])
    bounds = cu_seqlens_q.tolist()
    outs = []
    for a, b in zip(bounds, bounds[1:], strict=False):
        for t in range(a, b):
            outs.append(_attend_one(q[t], k[a:t + 1], v[a:t + 1], scale))
    return torch.stack(outs) if outs else torch.empty_like(q)


def _gather(cache: torch.Tensor, table: torch.Tensor, length: int) -> torch.Tensor:
    """Positions ``[0, length)`` of one sequence from its cache blocks → ``(length, kv, d)``."""
    block = cache.shape[1]
    blocks = table[:-(-length // block)].long()
    return cache[blocks].reshape(-1, *cache.shape[2:])[:length]


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    block_tables: torch.Tensor, context_lens: torch.Tensor,
                    softmax_scale: float | None = None) -> torch.Tensor:
    """Decode attention, each sequence's query over its cached keys in position order."""
    scale = _scale(softmax_scale, q.shape[-1])
    outs = []
    for i, length in enumerate(context_lens.tolist()):
        if length == 0:
            outs.append(torch.zeros_like(q[i]))
            continue
        outs.append(_attend_one(q[i], _gather(k_cache, block_tables[i], length),
                                _gather(v_cache, block_tables[i], length), scale))
    return torch.stack(outs) if outs else torch.empty_like(q)


def paged_prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            block_tables: torch.Tensor, cu_seqlens_q: torch.Tensor,
                            context_lens: torch.Tensor, max_seqlen_q: int,
                            softmax_scale: float | None = None) -> torch.Tensor:
    """New tokens over cached + new keys, each query over its own prefix."""
    scale = _scale(softmax_scale, q.shape[-1])
    bounds = cu_seqlens_q.tolist()
    outs = []
    for i, (a, b) in enumerate(zip(bounds, bounds[1:], strict=False)):
        length = int(context_lens[i])
        k = _gather(k_cache, block_tables[i], length)
        v = _gather(v_cache, block_tables[i], length)
        first = length - (b - a)  # position of the sequence's first new token
        for t in range(a, b):
            end = first + (t - a) + 1
            outs.append(_attend_one(q[t], k[:end], v[:end], scale))
    return torch.stack(outs) if outs else torch.empty_like(q)


_REPLACED = ("linear", "rms_norm", "layer_norm", "silu_mul", "apply_rope", "attention_varlen",
             "paged_attention", "paged_prefill_attention")


@contextlib.contextmanager
def enabled(on: bool = True) -> Iterator[None]:
    """Within the block, :mod:`llm_engine.ops` runs the batch-invariant functions above
    (``on=False``: a no-op, for call sites that take a flag)."""
    if not on:
        yield
        return
    saved = {name: getattr(ops, name) for name in _REPLACED}
    try:
        for name in _REPLACED:
            setattr(ops, name, globals()[name])
        yield
    finally:
        for name, fn in saved.items():
            setattr(ops, name, fn)
