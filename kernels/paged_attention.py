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
signature and semantics (``reference/paged_attention.py``, re-exported here); the
references are the CPU path of the engine.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import check_triton_device, check_window, interpreting, resolve_softmax_scale, sm_count
from .reference.paged_attention import (
    _check_decode,
    _check_prefill,
    _check_store,
    paged_attention_reference,
    paged_prefill_attention_reference,
    store_kv_cache_reference,
)

__all__ = [
    "paged_attention",
    "paged_attention_reference",
    "paged_prefill_attention",
    "paged_prefill_attention_reference",
    "store_kv_cache",
    "store_kv_cache_reference",
]


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
