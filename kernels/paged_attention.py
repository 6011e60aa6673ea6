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

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._utils import (
    FLOAT_DTYPES,
    check_last_dim_contiguous,
    check_tensor,
    check_triton_device,
    check_window,
    interpreting,
    resolve_softmax_scale,
    sm_count,
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


# ---------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------

_LOG2E = 1.4426950408889634
# Flash-decoding: a context is split into at most this many partitions, each at
# least _MIN_PARTITION tokens long, and only while the grid would otherwise be
# smaller than _WAVES programs per SM.
_MAX_PARTITIONS = 256
_MIN_PARTITION = 256
_WAVES = 4
_REDUCE_CHUNK = 16


@triton.jit
def _store_kv_kernel(
    k_ptr, v_ptr, kc_ptr, vc_ptr, slot_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_kcb, stride_kcs, stride_kch,
    stride_vcb, stride_vcs, stride_vch,
    kv_heads, head_dim,
    BLOCK_SIZE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot < 0:
        return
    blk = slot // BLOCK_SIZE
    off = slot % BLOCK_SIZE
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    mask = (h < kv_heads) & (d < head_dim)
    k = tl.load(k_ptr + t * stride_kt + h * stride_kh + d, mask=mask)
    v = tl.load(v_ptr + t * stride_vt + h * stride_vh + d, mask=mask)
    tl.store(kc_ptr + blk * stride_kcb + off * stride_kcs + h * stride_kch + d, k, mask=mask)
    tl.store(vc_ptr + blk * stride_vcb + off * stride_vcs + h * stride_vch + d, v, mask=mask)


@triton.jit
def _paged_kv_tile(kc_ptr, vc_ptr, bt_row, pos, pmask, d, dmask, kvh,
                   stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
                   BLOCK_SIZE: tl.constexpr):
    """K and V of KV head ``kvh`` at context positions ``pos`` (rows), read through the
    sequence's block-table row ``bt_row``; positions off ``pmask`` and lanes off ``dmask``
    read as zero."""
    blk = tl.load(bt_row + pos // BLOCK_SIZE, mask=pmask, other=0).to(tl.int64)
    off = pos % BLOCK_SIZE
    kv_mask = pmask[:, None] & dmask[None, :]
    k = tl.load(kc_ptr + (blk * stride_kb + off * stride_ks + kvh * stride_kh)[:, None]
                + d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(vc_ptr + (blk * stride_vb + off * stride_vs + kvh * stride_vh)[:, None]
                + d[None, :], mask=kv_mask, other=0.0)
    return k, v


@triton.jit
def _online_softmax_step(acc, l_i, m_i, s, v, IN_PREC: tl.constexpr):
    """Fold one tile of base-2 scores ``s`` (masked entries ``-inf``) and its values ``v``
    into the running (acc, l_i, m_i)."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=IN_PREC)
    return acc, l_i, m_new


@triton.jit
def _paged_decode_kernel(
    q_ptr, kc_ptr, vc_ptr, bt_ptr, lens_ptr, out_ptr, m_ptr, l_ptr, acc_ptr,
    stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_bts,
    stride_os, stride_oh,
    scale_log2, group, head_dim, partition_size, num_partitions,
    BLOCK_SIZE: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, SPLIT: tl.constexpr, IN_PREC: tl.constexpr,
    WINDOW: tl.constexpr = 0,
):
    """One program: every query head of one KV head of one sequence, over one
    partition of its context (the whole context when not SPLIT); with WINDOW > 0,
    over the part of it within the last WINDOW positions."""
    seq = tl.program_id(0)
    kvh = tl.program_id(1)
    part = tl.program_id(2)
    ctx = tl.load(lens_ptr + seq)
    start = part * partition_size
    if part > 0 and start >= ctx:
        return
    end = tl.minimum(start + partition_size, ctx)

    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, BLOCK_D)
    heads = kvh * group + g
    gmask = g < group
    dmask = d < head_dim
    q = tl.load(
        q_ptr + seq.to(tl.int64) * stride_qs + heads[:, None] * stride_qh + d[None, :],
        mask=gmask[:, None] & dmask[None, :], other=0.0,
    )
    bt_row = bt_ptr + seq.to(tl.int64) * stride_bts
    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, BLOCK_D], tl.float32)
    if WINDOW > 0:
        start = tl.maximum(start, ctx - WINDOW)
    for n0 in range(start, end, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        pmask = pos < end
        k, v = _paged_kv_tile(kc_ptr, vc_ptr, bt_row, pos, pmask, d, dmask, kvh, stride_kb,
                              stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, BLOCK_SIZE)
        s = tl.dot(q, tl.trans(k), input_precision=IN_PREC) * scale_log2
        s = tl.where(pmask[None, :], s, float("-inf"))
        acc, l_i, m_i = _online_softmax_step(acc, l_i, m_i, s, v, IN_PREC)

    out_mask = gmask[:, None] & dmask[None, :]
    if SPLIT:
        row = (seq * group * tl.num_programs(1) + heads).to(tl.int64) * num_partitions + part
        tl.store(m_ptr + row, m_i, mask=gmask)
        tl.store(l_ptr + row, l_i, mask=gmask)
        tl.store(acc_ptr + row[:, None] * head_dim + d[None, :], acc, mask=out_mask)
    else:
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # an empty context gives zeros
        tl.store(out_ptr + seq.to(tl.int64) * stride_os + heads[:, None] * stride_oh + d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _paged_decode_reduce_kernel(
    m_ptr, l_ptr, acc_ptr, lens_ptr, out_ptr,
    stride_os, stride_oh,
    head_dim, partition_size, num_partitions,
    CHUNK: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Merge the partial softmax states of one (sequence, head) into its output."""
    seq = tl.program_id(0)
    h = tl.program_id(1)
    ctx = tl.load(lens_ptr + seq)
    n_parts = tl.cdiv(ctx, partition_size)
    base = (seq * tl.num_programs(1) + h).to(tl.int64) * num_partitions
    m_chunks = tl.full([CHUNK], float("-inf"), tl.float32)
    for c0 in range(0, n_parts, CHUNK):
        pc = c0 + tl.arange(0, CHUNK)
        m_chunks = tl.maximum(m_chunks, tl.load(m_ptr + base + pc, mask=pc < n_parts,
                                                other=float("-inf")))
    m_max = tl.max(m_chunks, 0)
    d = tl.arange(0, BLOCK_D)
    dmask = d < head_dim
    total = tl.zeros([BLOCK_D], tl.float32)
    norm = tl.zeros([CHUNK], tl.float32)
    for c0 in range(0, n_parts, CHUNK):
        pc = c0 + tl.arange(0, CHUNK)
        pcmask = pc < n_parts
        mc = tl.load(m_ptr + base + pc, mask=pcmask, other=float("-inf"))
        lc = tl.load(l_ptr + base + pc, mask=pcmask, other=0.0)
        w = tl.exp2(mc - m_max)
        norm += w * lc
        a = tl.load(acc_ptr + (base + pc)[:, None] * head_dim + d[None, :],
                    mask=pcmask[:, None] & dmask[None, :], other=0.0)
        total += tl.sum(a * w[:, None], 0)
    norm_sum = tl.sum(norm, 0)
    out = total / tl.where(norm_sum > 0, norm_sum, 1.0)  # an empty context gives zeros
    tl.store(out_ptr + seq.to(tl.int64) * stride_os + h * stride_oh + d,
             out.to(out_ptr.dtype.element_ty), mask=dmask)


@triton.jit
def _paged_prefill_kernel(
    q_ptr, kc_ptr, vc_ptr, bt_ptr, cu_ptr, lens_ptr, out_ptr,
    stride_qt, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_bts,
    stride_ot, stride_oh,
    scale_log2, group, head_dim,
    BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, IN_PREC: tl.constexpr,
    WINDOW: tl.constexpr = 0,
):
    """One program: BLOCK_M new queries of one head of one sequence, over the
    sequence's cached + new keys up to the last of those queries (with WINDOW > 0,
    from the first key in the first query's window)."""
    mblk = tl.program_id(0)
    seq = tl.program_id(1)
    h = tl.program_id(2)
    q_start = tl.load(cu_ptr + seq)
    n_q = tl.load(cu_ptr + seq + 1) - q_start
    if mblk * BLOCK_M >= n_q:
        return
    ctx = tl.load(lens_ptr + seq)
    kvh = h // group

    offs_m = mblk * BLOCK_M + tl.arange(0, BLOCK_M)
    mmask = offs_m < n_q
    q_pos = ctx - n_q + offs_m
    d = tl.arange(0, BLOCK_D)
    dmask = d < head_dim
    rows = (q_start + offs_m).to(tl.int64)
    q = tl.load(q_ptr + rows[:, None] * stride_qt + h * stride_qh + d[None, :],
                mask=mmask[:, None] & dmask[None, :], other=0.0)
    bt_row = bt_ptr + seq.to(tl.int64) * stride_bts
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    hi = tl.minimum(ctx, ctx - n_q + (mblk + 1) * BLOCK_M)
    lo = 0
    if WINDOW > 0:
        lo = tl.maximum(ctx - n_q + mblk * BLOCK_M - WINDOW + 1, 0)
    for n0 in range(lo, hi, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        pmask = pos < hi
        k, v = _paged_kv_tile(kc_ptr, vc_ptr, bt_row, pos, pmask, d, dmask, kvh, stride_kb,
                              stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, BLOCK_SIZE)
        s = tl.dot(q, tl.trans(k), input_precision=IN_PREC) * scale_log2
        visible = pmask[None, :] & (pos[None, :] <= q_pos[:, None])
        if WINDOW > 0:
            visible = visible & (pos[None, :] > q_pos[:, None] - WINDOW)
        s = tl.where(visible, s, float("-inf"))
        acc, l_i, m_i = _online_softmax_step(acc, l_i, m_i, s, v, IN_PREC)
    out = acc / l_i[:, None]
    tl.store(out_ptr + rows[:, None] * stride_ot + h * stride_oh + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=mmask[:, None] & dmask[None, :])


# ---------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------


def _check_devices(**tensors: torch.Tensor) -> None:
    for name, t in tensors.items():
        check_triton_device(name, t)


def _in_prec(dtype: torch.dtype) -> str | None:
    """fp32 inputs keep full precision in ``tl.dot`` (no TF32); others use the default."""
    return "ieee" if dtype == torch.float32 else None


def _block_d(head_dim: int) -> int:
    """Head dim padded to a power of two, at least 16 (``tl.dot``'s smallest K)."""
    return max(16, triton.next_power_of_2(head_dim))


def _num_stages(block_n: int, block_d: int, dtype: torch.dtype) -> int:
    """Pipeline depth whose K and V tiles fit in ~128 KiB of shared memory."""
    if interpreting():
        return 1
    per_stage = 2 * block_n * block_d * dtype.itemsize
    return max(1, min(3, (128 << 10) // per_stage))


def _programs_target(device: torch.device) -> int:
    """How many programs fill the device a few times over."""
    if device.type != "cuda":
        return 16
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _WAVES * sm_count(index)


def _decode_block_n(head_dim: int) -> int:
    """Keys per step of the decode loop; 32 from head_dim 128 up (at 64, the split
    kernel's 16-bit build spilled under Triton 3.9)."""
    if interpreting():
        return 16
    return 32 if head_dim >= 128 else 64


def _decode_options(block_n: int, block_d: int, dtype: torch.dtype) -> dict[str, int]:
    """Launch options of the decode kernel."""
    return {"num_warps": 4, "num_stages": _num_stages(block_n, block_d, dtype)}


def _prefill_config(head_dim: int, dtype: torch.dtype) -> tuple[int, int, dict[str, int]]:
    """``(BLOCK_M, BLOCK_N, launch options)`` of the prefill kernel."""
    block_d = _block_d(head_dim)
    if interpreting():
        block_m, block_n, warps = 16, 16, 4
    elif dtype == torch.float32:
        # Full-precision dots run on CUDA cores and hold a head_dim row of each operand
        # per thread: larger tiles spill (kernels/compile_table.py).
        block_m = block_n = 32 if head_dim <= 64 else 16
        warps = 4
    elif head_dim <= 64:
        block_m, block_n, warps = 128, 64, 8
    else:  # 8 warps: at 4, the head_dim-128 tile spilled on sm_80
        block_m, block_n, warps = 64, 64 if head_dim <= 128 else 32, 8
    return block_m, block_n, {"num_warps": warps,
                              "num_stages": _num_stages(block_n, block_d, dtype)}


def _choose_partition(max_context: int, base_programs: int, block_n: int,
                      target_programs: int) -> int:
    """Tokens per partition (a multiple of ``block_n``): the whole context when the
    ``base_programs`` (sequences × KV heads) already reach ``target_programs``; else
    enough partitions of at least ``_MIN_PARTITION`` tokens to reach it, at most
    ``_MAX_PARTITIONS``."""
    whole = triton.cdiv(max_context, block_n) * block_n
    splits = min(triton.cdiv(target_programs, base_programs),
                 max_context // _MIN_PARTITION)
    if splits <= 1:
        return whole
    size = triton.cdiv(triton.cdiv(max_context, splits), block_n) * block_n
    return max(size, triton.cdiv(triton.cdiv(max_context, _MAX_PARTITIONS), block_n) * block_n)


def store_kv_cache(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Write each new token's K/V into its cache slot, in place (Triton).

    Args:
        k, v: ``(num_tokens, kv_heads, head_dim)`` fp16/bf16/fp32, the cache dtype.
        k_cache, v_cache: ``(num_blocks, block_size, kv_heads, head_dim)``, last dim contiguous.
        slot_mapping: ``(num_tokens,)`` int32/int64; token ``i`` goes to block
            ``slot // block_size``, offset ``slot % block_size``; ``-1`` skips the token.
    """
    _, block_size, kv_heads, head_dim = _check_store(k, v, k_cache, v_cache, slot_mapping)
    _check_devices(k=k, v=v, k_cache=k_cache, v_cache=v_cache, slot_mapping=slot_mapping)
    num_tokens = k.shape[0]
    if num_tokens == 0:
        return
    _store_kv_kernel[(num_tokens,)](
        k, v, k_cache, v_cache, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        kv_heads, head_dim,
        BLOCK_SIZE=block_size, BLOCK_H=triton.next_power_of_2(kv_heads),
        BLOCK_D=triton.next_power_of_2(head_dim),
    )


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    softmax_scale: float | None = None,
    *,
    partition_size: int | None = None,
    window: int | None = None,
) -> torch.Tensor:
    """Decode attention over a paged KV cache (Triton): one query token per sequence.

    Args:
        q: ``(num_seqs, heads, head_dim)`` fp16/bf16/fp32, last dim contiguous.
        k_cache, v_cache: ``(num_blocks, block_size, kv_heads, head_dim)`` in q's dtype;
            ``heads`` must be a multiple of ``kv_heads`` (grouped-query attention).
        block_tables: ``(num_seqs, max_blocks)`` int32; entries past a sequence's
            context are never read (they may be -1 or garbage).
        context_lens: ``(num_seqs,)`` int32, each in ``[0, max_blocks * block_size]``
            (not checked on the device: no host sync, so the call can be graph-captured);
            a sequence of length 0 (batch padding) gets a zero output.
        softmax_scale: defaults to ``1 / sqrt(head_dim)``.
        partition_size: tokens per flash-decoding partition, a positive multiple of 16;
            ``None`` picks it from ``num_seqs * kv_heads`` and the widest possible context,
            ``max_blocks * block_size`` (known on the host, so no sync), splitting only
            when the unsplit grid would leave the device under-used.
        window: attend only to the last ``window`` positions of each context (a
            sliding window); None for the whole context.

    Returns:
        ``(num_seqs, heads, head_dim)`` in q's dtype.
    """
    _, block_size, kv_heads, head_dim = _check_decode(
        q, k_cache, v_cache, block_tables, context_lens
    )
    _check_devices(q=q, k_cache=k_cache, v_cache=v_cache, block_tables=block_tables,
                   context_lens=context_lens)
    scale = resolve_softmax_scale(softmax_scale, head_dim)
    window = check_window(window)
    num_seqs, heads, _ = q.shape
    group = heads // kv_heads
    out = torch.empty_like(q)
    if num_seqs == 0:
        return out
    max_context = block_tables.shape[1] * block_size
    block_n = _decode_block_n(head_dim)
    if partition_size is None:
        partition_size = _choose_partition(max_context, num_seqs * kv_heads, block_n,
                                           _programs_target(q.device))
    elif (not isinstance(partition_size, int) or isinstance(partition_size, bool)
          or partition_size <= 0 or partition_size % 16):
        raise ValueError(
            f"partition_size must be a positive multiple of 16, got {partition_size!r}"
        )
    while partition_size % block_n:
        block_n //= 2
    num_partitions = triton.cdiv(max_context, partition_size)
    split = num_partitions > 1
    block_d = _block_d(head_dim)
    if split:
        m = torch.empty(num_seqs, heads, num_partitions, device=q.device, dtype=torch.float32)
        l = torch.empty_like(m)
        acc = torch.empty(num_seqs, heads, num_partitions, head_dim, device=q.device,
                          dtype=torch.float32)
    else:
        m = l = acc = out
    _paged_decode_kernel[(num_seqs, kv_heads, num_partitions)](
        q, k_cache, v_cache, block_tables, context_lens, out, m, l, acc,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0),
        out.stride(0), out.stride(1),
        scale * _LOG2E, group, head_dim, partition_size, num_partitions,
        BLOCK_SIZE=block_size, GROUP_PAD=max(16, triton.next_power_of_2(group)),
        BLOCK_N=block_n, BLOCK_D=block_d, SPLIT=split, IN_PREC=_in_prec(q.dtype),
        WINDOW=window or 0, **_decode_options(block_n, block_d, q.dtype),
    )
    if split:
        _paged_decode_reduce_kernel[(num_seqs, heads)](
            m, l, acc, context_lens, out,
            out.stride(0), out.stride(1),
            head_dim, partition_size, num_partitions,
            CHUNK=_REDUCE_CHUNK,
            BLOCK_D=block_d,
        )
    return out


def paged_prefill_attention(
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
    """Attention of new tokens over their sequence's cached + new K/V (Triton).

    The new tokens' K/V must already be in the cache (``store_kv_cache``). Query
    ``i`` of a sequence with ``seqlen_q`` new tokens and ``context_len`` tokens in
    all sits at position ``context_len - seqlen_q + i`` and attends to positions
    ``<=`` its own (causal, aligned to the end of the context). Used for prefill
    after a prefix-cache hit and for chunked prefill.

    Args:
        q: ``(total_q, heads, head_dim)`` fp16/bf16/fp32, the new tokens of every
            sequence packed; last dim contiguous.
        k_cache, v_cache: ``(num_blocks, block_size, kv_heads, head_dim)`` in q's dtype.
        block_tables: ``(num_seqs, max_blocks)`` int32.
        cu_seqlens_q: ``(num_seqs + 1,)`` int32, sequence ``b``'s queries are rows
            ``cu_seqlens_q[b]:cu_seqlens_q[b + 1]`` of q.
        context_lens: ``(num_seqs,)`` int32, cached + new tokens of each sequence
            (``>= seqlen_q``, ``<= max_blocks * block_size``; not checked on the device).
        max_seqlen_q: the largest ``seqlen_q`` (a host int: sizes the grid).
        softmax_scale: defaults to ``1 / sqrt(head_dim)``.
        window: each query sees only the last ``window`` positions up to its own (a
            sliding window); None for all of them.

    Returns:
        ``(total_q, heads, head_dim)`` in q's dtype.
    """
    _, block_size, kv_heads, head_dim = _check_prefill(
        q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, max_seqlen_q
    )
    _check_devices(q=q, k_cache=k_cache, v_cache=v_cache, block_tables=block_tables,
                   cu_seqlens_q=cu_seqlens_q, context_lens=context_lens)
    scale = resolve_softmax_scale(softmax_scale, head_dim)
    window = check_window(window)
    num_seqs = cu_seqlens_q.shape[0] - 1
    heads = q.shape[1]
    out = torch.empty_like(q)
    if q.shape[0] == 0:
        return out
    block_d = _block_d(head_dim)
    block_m, block_n, options = _prefill_config(head_dim, q.dtype)
    grid = (triton.cdiv(max_seqlen_q, block_m), num_seqs, heads)
    _paged_prefill_kernel[grid](
        q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, out,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0),
        out.stride(0), out.stride(1),
        scale * _LOG2E, heads // kv_heads, head_dim,
        BLOCK_SIZE=block_size, BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_D=block_d, IN_PREC=_in_prec(q.dtype), WINDOW=window or 0, **options,
    )
    return out
