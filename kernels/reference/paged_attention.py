"""Paged KV cache in plain PyTorch: the input checks shared with the Triton kernels of
``llm_engine.kernels.paged_attention`` (whose docstring describes the cache layout),
and the references of ``store_kv_cache``, ``paged_attention`` and
``paged_prefill_attention`` (fp32 math), the CPU path of the engine."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._utils import (
    FLOAT_DTYPES,
    check_last_dim_contiguous,
    check_tensor,
    check_window,
    resolve_softmax_scale,
)

_INDEX_DTYPES = (torch.int32, torch.int64)


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
    check_tensor("slot_mapping", slot_mapping, dtypes=_INDEX_DTYPES, ndim=1)
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
    check_last_dim_contiguous("slot_mapping", slot_mapping)
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
    check_last_dim_contiguous("block_tables", block_tables)
    check_last_dim_contiguous("context_lens", context_lens)
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
    check_last_dim_contiguous("cu_seqlens_q", cu_seqlens_q)
    num_seqs = cu_seqlens_q.shape[0] - 1
    dims = _check_attention_common(
        q, k_cache, v_cache, block_tables, context_lens, num_seqs, "total_q"
    )
    _check_same_device(q=q, cu_seqlens_q=cu_seqlens_q)
    if not isinstance(max_seqlen_q, int) or isinstance(max_seqlen_q, bool) or max_seqlen_q < 1:
        raise ValueError(f"max_seqlen_q must be a positive int, got {max_seqlen_q!r}")
    return dims


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
    if not bool(keep.all()):
        slots, k, v = slots[keep], k[keep], v[keep]
    for cache, new in ((k_cache, k), (v_cache, v)):
        if cache.is_contiguous():
            cache.view(-1, *cache.shape[2:]).index_copy_(0, slots, new)
        else:
            cache[slots // block_size, slots % block_size] = new


def _gather_context(cache: torch.Tensor, table: torch.Tensor, length: int) -> torch.Tensor:
    """K or V of positions ``0..length-1`` of one sequence: ``(length, kv_heads, head_dim)``."""
    block_size = cache.shape[1]
    n_blocks = -(-length // block_size)
    blocks = table[:n_blocks].long()
    return cache.index_select(0, blocks).reshape(n_blocks * block_size, *cache.shape[2:])[:length]


def paged_attention_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    softmax_scale: float | None = None,
    window: int | None = None,
) -> torch.Tensor:
    """Decode attention through block tables, in fp32; same contract as ``paged_attention``.
    ``window``: attend only to the last ``window`` positions of each context."""
    window = check_window(window)
    _, block_size, kv_heads, head_dim = _check_decode(
        q, k_cache, v_cache, block_tables, context_lens
    )
    scale = resolve_softmax_scale(softmax_scale, head_dim)
    num_seqs, heads, _ = q.shape
    group = heads // kv_heads
    lens = context_lens.long()
    min_len, max_len = (int(x) for x in torch.aminmax(lens))
    if min_len < 0 or max_len > block_tables.shape[1] * block_size:
        raise ValueError(
            f"context_lens must lie in [0, max_blocks * block_size = "
            f"{block_tables.shape[1] * block_size}], got {context_lens.tolist()}"
        )
    pos = torch.arange(max_len, device=q.device)
    valid = pos[None, :] < lens[:, None]  # (num_seqs, max_len)
    if window is not None:
        valid &= pos[None, :] >= lens[:, None] - window
    slots = block_tables[:, pos // block_size].long() * block_size + pos % block_size
    slots = slots.masked_fill(~valid, 0).view(-1)  # padding entries may be garbage
    # One index_select over the flat slots: a single gather instead of 2-D advanced indexing.
    k, v = (cache.flatten(0, 1).index_select(0, slots).view(num_seqs, max_len, kv_heads, head_dim)
            .float().transpose(1, 2) for cache in (k_cache, v_cache))  # (seqs, kv_heads, len, d)
    out = F.scaled_dot_product_attention(  # the mask only when lengths differ
        q.float().unsqueeze(2), k, v, attn_mask=(valid[:, None, None, :]
                                               if min_len < max_len or window is not None else None),
        scale=scale, enable_gqa=group > 1,
    ).squeeze(2)  # (num_seqs, heads, head_dim)
    if min_len == 0:
        out = out.masked_fill((lens == 0)[:, None, None], 0.0)  # empty context: zeros
    return out.to(q.dtype)


def paged_prefill_attention_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    context_lens: torch.Tensor,
    max_seqlen_q: int,
    softmax_scale: float | None = None,
    window: int | None = None,
) -> torch.Tensor:
    """Attention of new tokens over cached + new K/V, in fp32; same contract as
    ``paged_prefill_attention``. ``window``: each query sees only the last ``window``
    positions up to its own."""
    window = check_window(window)
    _, block_size, kv_heads, head_dim = _check_prefill(
        q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, max_seqlen_q
    )
    scale = resolve_softmax_scale(softmax_scale, head_dim)
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
        # With a window, the blocks before the first query's window are never read
        # (an engine may have released them: their table entries are -1).
        first = 0 if window is None else max(0, ctx - n_q - window + 1) // block_size
        table = block_tables[b, first:]
        k = _gather_context(k_cache, table, ctx - first * block_size).float()  # (keys, kv_heads, d)
        v = _gather_context(v_cache, table, ctx - first * block_size).float()
        qb = q[start:end].float().view(n_q, kv_heads, group, head_dim)
        scores = torch.einsum("qkgd,tkd->kgqt", qb, k) * scale
        q_pos = torch.arange(ctx - n_q, ctx, device=q.device)
        k_pos = torch.arange(first * block_size, ctx, device=q.device)
        hidden = k_pos[None, :] > q_pos[:, None]
        if window is not None:
            hidden |= k_pos[None, :] <= q_pos[:, None] - window
        scores = scores.masked_fill(hidden, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        ob = torch.einsum("kgqt,tkd->qkgd", probs, v)
        out[start:end] = ob.reshape(n_q, heads, head_dim).to(q.dtype)
    return out
