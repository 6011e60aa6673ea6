"""Paged KV cache: writing new K/V into cache slots, and attention that reads K/V
through block tables.

Cache layout, per layer: ``k_cache, v_cache: (num_blocks, block_size, kv_heads,
head_dim)``. A sequence's token at position ``p`` lives in block
``block_tables[seq, p // block_size]`` at offset ``p % block_size``; its slot is
``block_id * block_size + offset``.

- ``store_kv_cache``: each new token's K/V into its slot (slot ``-1`` skipped).
- ``paged_attention``: decode, one query token per sequence over its whole
  context. Grouped-query aware (one program serves every query head of a KV
  head, so K/V is read once) and split along the context (flash-decoding):
  partitions write partial (max, sum, accumulator) and a second kernel merges
  them, so one long sequence still fills the GPU.
- ``paged_prefill_attention``: new tokens (packed) over the cached prefix plus
  themselves, causal with the queries aligned to the end of each context:
  prefill after a prefix-cache hit, and chunked prefill.

Each has a plain-PyTorch reference (``*_reference``, fp32 math) with the same
signature and semantics; the references are the CPU path of the engine.
"""

from __future__ import annotations

import math

import torch

from ._utils import FLOAT_DTYPES, check_last_dim_contiguous, check_tensor

INDEX_DTYPES = (torch.int32, torch.int64)


# ---------------------------------------------------------------------------
# Input validation, shared by the kernels and the references
# ---------------------------------------------------------------------------


def _check_same_device(**tensors: torch.Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items()}
    first_name, first = next(iter(devices.items()))
    for name, dev in devices.items():
        if dev != first:
            raise ValueError(f"{name} is on {dev} but {first_name} is on {first}")


def _check_cache(k_cache: object, v_cache: object) -> tuple[int, int, int, int]:
    """Validate the pair of caches; return ``(num_blocks, block_size, kv_heads, head_dim)``."""
    check_tensor("k_cache", k_cache, dtypes=FLOAT_DTYPES, ndim=4)
    check_tensor("v_cache", v_cache, dtypes=FLOAT_DTYPES, ndim=4)
    if v_cache.shape != k_cache.shape:
        raise ValueError(
            "v_cache must have the shape of k_cache (num_blocks, block_size, kv_heads, head_dim), "
            f"got {tuple(v_cache.shape)} vs {tuple(k_cache.shape)}"
        )
    if v_cache.dtype != k_cache.dtype:
        raise ValueError(
            f"v_cache dtype {v_cache.dtype} differs from k_cache dtype {k_cache.dtype}"
        )
    check_last_dim_contiguous("k_cache", k_cache)
    check_last_dim_contiguous("v_cache", v_cache)
    _check_same_device(k_cache=k_cache, v_cache=v_cache)
    num_blocks, block_size, kv_heads, head_dim = k_cache.shape
    if num_blocks == 0 or block_size == 0 or kv_heads == 0 or head_dim == 0:
        raise ValueError(f"k_cache has an empty dimension: shape {tuple(k_cache.shape)}")
    return num_blocks, block_size, kv_heads, head_dim


def _check_store(k, v, k_cache, v_cache, slot_mapping) -> tuple[int, int, int, int]:
    num_blocks, block_size, kv_heads, head_dim = _check_cache(k_cache, v_cache)
    check_tensor("k", k, dtypes=FLOAT_DTYPES, ndim=3)
    check_tensor("v", v, dtypes=FLOAT_DTYPES, ndim=3)
    check_tensor("slot_mapping", slot_mapping, dtypes=INDEX_DTYPES, ndim=1)
    expected = (k.shape[0], kv_heads, head_dim)
    if tuple(k.shape) != expected:
        raise ValueError(
            f"k must have shape (num_tokens, kv_heads={kv_heads}, head_dim={head_dim}), "
            f"got {tuple(k.shape)}"
        )
    if v.shape != k.shape:
        raise ValueError(f"v must have the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
    if k.dtype != k_cache.dtype or v.dtype != k_cache.dtype:
        raise ValueError(
            f"k and v must have the cache dtype {k_cache.dtype}, got {k.dtype} and {v.dtype}"
        )
    if slot_mapping.shape[0] != k.shape[0]:
        raise ValueError(
            f"slot_mapping must have shape (num_tokens={k.shape[0]},), "
            f"got {tuple(slot_mapping.shape)}"
        )
    check_last_dim_contiguous("k", k)
    check_last_dim_contiguous("v", v)
    _check_same_device(k_cache=k_cache, k=k, v=v, slot_mapping=slot_mapping)
    return num_blocks, block_size, kv_heads, head_dim


def _check_attention_common(q, k_cache, v_cache, block_tables, context_lens, num_seqs, q_name):
    num_blocks, block_size, kv_heads, head_dim = _check_cache(k_cache, v_cache)
    check_tensor("q", q, dtypes=FLOAT_DTYPES, ndim=3)
    heads = q.shape[1]
    if q.shape[2] != head_dim:
        raise ValueError(
            f"q must have shape ({q_name}, heads, head_dim={head_dim}) to match k_cache, "
            f"got {tuple(q.shape)}"
        )
    if heads == 0 or heads % kv_heads != 0:
        raise ValueError(
            f"q heads ({heads}) must be a positive multiple of the cache's kv_heads ({kv_heads}); "
            f"q shape {tuple(q.shape)}, k_cache shape {tuple(k_cache.shape)}"
        )
    if q.dtype != k_cache.dtype:
        raise ValueError(f"q dtype {q.dtype} differs from k_cache dtype {k_cache.dtype}")
    check_last_dim_contiguous("q", q)
    check_tensor("block_tables", block_tables, dtypes=(torch.int32,), ndim=2)
    if block_tables.shape[0] != num_seqs or block_tables.shape[1] == 0:
        raise ValueError(
            f"block_tables must have shape (num_seqs={num_seqs}, max_blocks >= 1), "
            f"got {tuple(block_tables.shape)}"
        )
    check_tensor("context_lens", context_lens, dtypes=(torch.int32,), ndim=1)
    if context_lens.shape[0] != num_seqs:
        raise ValueError(
            f"context_lens must have shape (num_seqs={num_seqs},), got {tuple(context_lens.shape)}"
        )
    _check_same_device(q=q, k_cache=k_cache, block_tables=block_tables, context_lens=context_lens)
    return num_blocks, block_size, kv_heads, head_dim


def _check_decode(q, k_cache, v_cache, block_tables, context_lens):
    check_tensor("q", q, dtypes=FLOAT_DTYPES, ndim=3)
    return _check_attention_common(
        q, k_cache, v_cache, block_tables, context_lens, q.shape[0], "num_seqs"
    )


def _check_prefill(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, max_seqlen_q):
    check_tensor("cu_seqlens_q", cu_seqlens_q, dtypes=(torch.int32,), ndim=1)
    if cu_seqlens_q.shape[0] < 2:
        raise ValueError(
            f"cu_seqlens_q must have shape (num_seqs + 1,) with num_seqs >= 1, "
            f"got {tuple(cu_seqlens_q.shape)}"
        )
    num_seqs = cu_seqlens_q.shape[0] - 1
    dims = _check_attention_common(
        q, k_cache, v_cache, block_tables, context_lens, num_seqs, "total_q"
    )
    _check_same_device(q=q, cu_seqlens_q=cu_seqlens_q)
    if not isinstance(max_seqlen_q, int) or isinstance(max_seqlen_q, bool) or max_seqlen_q < 1:
        raise ValueError(f"max_seqlen_q must be a positive int, got {max_seqlen_q!r}")
    return dims


def _scale(softmax_scale: float | None, head_dim: int) -> float:
    if softmax_scale is None:
        return 1.0 / math.sqrt(head_dim)
    if not isinstance(softmax_scale, (int, float)) or not softmax_scale > 0:
        raise ValueError(f"softmax_scale must be a positive number, got {softmax_scale!r}")
    return float(softmax_scale)


# ---------------------------------------------------------------------------
# References (plain PyTorch, fp32 math): the CPU path of the engine
# ---------------------------------------------------------------------------


def store_kv_cache_reference(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Write ``k[i], v[i]`` into slot ``slot_mapping[i]`` of the caches, in place.

    ``k, v: (num_tokens, kv_heads, head_dim)`` in the cache dtype;
    ``k_cache, v_cache: (num_blocks, block_size, kv_heads, head_dim)``;
    ``slot_mapping: (num_tokens,)`` int32/int64, slot ``-1`` means "do not store".
    """
    _, block_size, _, _ = _check_store(k, v, k_cache, v_cache, slot_mapping)
    slots = slot_mapping.long()
    keep = slots >= 0
    slots = slots[keep]
    blocks, offsets = slots // block_size, slots % block_size
    k_cache[blocks, offsets] = k[keep]
    v_cache[blocks, offsets] = v[keep]


def _gather_context(cache: torch.Tensor, table: torch.Tensor, length: int) -> torch.Tensor:
    """K or V of positions ``0..length-1`` of one sequence: ``(length, kv_heads, head_dim)``."""
    block_size = cache.shape[1]
    n_blocks = -(-length // block_size)
    blocks = table[:n_blocks].long()
    return cache[blocks].reshape(n_blocks * block_size, *cache.shape[2:])[:length]


def paged_attention_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    softmax_scale: float | None = None,
) -> torch.Tensor:
    """Decode attention through block tables, in fp32; same contract as ``paged_attention``."""
    _, block_size, kv_heads, head_dim = _check_decode(
        q, k_cache, v_cache, block_tables, context_lens
    )
    scale = _scale(softmax_scale, head_dim)
    num_seqs, heads, _ = q.shape
    group = heads // kv_heads
    lens = context_lens.long()
    max_len = int(lens.max().item())
    if int(lens.min().item()) < 1 or max_len > block_tables.shape[1] * block_size:
        raise ValueError(
            f"context_lens must lie in [1, max_blocks * block_size = "
            f"{block_tables.shape[1] * block_size}], got {context_lens.tolist()}"
        )
    pos = torch.arange(max_len, device=q.device)
    valid = pos[None, :] < lens[:, None]  # (num_seqs, max_len)
    blocks = block_tables.long()[:, pos // block_size]
    blocks = torch.where(valid, blocks, torch.zeros_like(blocks))  # padding entries may be garbage
    offsets = (pos % block_size).expand(num_seqs, -1)
    k = k_cache[blocks, offsets].float()  # (num_seqs, max_len, kv_heads, head_dim)
    v = v_cache[blocks, offsets].float()
    qg = q.float().view(num_seqs, kv_heads, group, head_dim)
    scores = torch.einsum("skgd,stkd->skgt", qg, k) * scale
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out = torch.einsum("skgt,stkd->skgd", probs, v)
    return out.reshape(num_seqs, heads, head_dim).to(q.dtype)


def paged_prefill_attention_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    context_lens: torch.Tensor,
    max_seqlen_q: int,
    softmax_scale: float | None = None,
) -> torch.Tensor:
    """Attention of new tokens over cached + new K/V, in fp32; same contract as
    ``paged_prefill_attention``."""
    _, block_size, kv_heads, head_dim = _check_prefill(
        q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, max_seqlen_q
    )
    scale = _scale(softmax_scale, head_dim)
    heads = q.shape[1]
    group = heads // kv_heads
    cu = cu_seqlens_q.tolist()
    lens = context_lens.tolist()
    if cu[0] != 0 or cu[-1] != q.shape[0]:
        raise ValueError(
            f"cu_seqlens_q must start at 0 and end at total_q={q.shape[0]}, got {cu}"
        )
    out = torch.empty_like(q)
    for b, ctx in enumerate(lens):
        start, end = cu[b], cu[b + 1]
        n_q = end - start
        if n_q < 0 or n_q > max_seqlen_q or n_q > ctx or ctx > block_tables.shape[1] * block_size:
            raise ValueError(
                f"sequence {b}: needs 0 <= seqlen_q ({n_q}) <= min(max_seqlen_q={max_seqlen_q}, "
                f"context_len={ctx}) and context_len <= max_blocks * block_size "
                f"({block_tables.shape[1] * block_size})"
            )
        if n_q == 0:
            continue
        k = _gather_context(k_cache, block_tables[b], ctx).float()  # (ctx, kv_heads, head_dim)
        v = _gather_context(v_cache, block_tables[b], ctx).float()
        qb = q[start:end].float().view(n_q, kv_heads, group, head_dim)
        scores = torch.einsum("qkgd,tkd->kgqt", qb, k) * scale
        q_pos = torch.arange(ctx - n_q, ctx, device=q.device)
        k_pos = torch.arange(ctx, device=q.device)
        scores = scores.masked_fill(k_pos[None, :] > q_pos[:, None], float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        ob = torch.einsum("kgqt,tkd->qkgd", probs, v)
        out[start:end] = ob.reshape(n_q, heads, head_dim).to(q.dtype)
    return out
