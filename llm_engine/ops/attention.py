"""Attention: over packed sequences (prefill, training), and over the paged K/V cache
(decode, prefill on a cached prefix), plus the K/V cache store."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llm_engine import _C
from llm_engine.kernels import check_window, resolve_softmax_scale
from llm_engine.kernels.reference import attention as attention_ref
from llm_engine.kernels.reference import paged_attention as paged_ref
from llm_engine.ops.common import (
    ANY,
    cpp_needs,
    never,
    on_cuda,
    rows_apart,
    triton_kernel,
    triton_needs,
)
from llm_engine.ops.dispatch import Needs, Op, registry, tensor_facts


def _varlen_signature(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, *args,
                      **kwargs) -> tuple:
    return (*tensor_facts("attention_varlen", q, k, v),
            cu_seqlens_q is cu_seqlens_k or torch.equal(cu_seqlens_q, cu_seqlens_k))


def _store_signature(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                     v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> tuple:
    return (*tensor_facts("store_kv_cache", k, v, k_cache, v_cache),
            slot_mapping.dtype == torch.int64 and slot_mapping.is_cpu
            and k_cache.is_contiguous() and v_cache.is_contiguous())


def _decode_signature(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      block_tables: torch.Tensor, context_lens: torch.Tensor,
                      softmax_scale: float | None = None) -> tuple:
    return (*tensor_facts("paged_attention", q, k_cache, v_cache),
            block_tables.is_cpu and context_lens.is_cpu
            and block_tables.dtype == context_lens.dtype == torch.int32
            and q.dim() == 3 and k_cache.dim() == v_cache.dim() == 4
            and k_cache.is_contiguous() and v_cache.is_contiguous())


def _prefill_signature(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                       *args, **kwargs) -> tuple:
    return tensor_facts("paged_prefill_attention", q, k_cache, v_cache)


ATTENTION_VARLEN = registry().add(Op("attention_varlen", _varlen_signature, {
    "self": "cu_seqlens_q == cu_seqlens_k",
}, "attention over packed sequences"))
STORE_KV_CACHE = registry().add(Op("store_kv_cache", _store_signature, {
    "layout": "contiguous caches, int64 CPU slot_mapping",
}, "write K/V into cache slots"))
PAGED_ATTENTION = registry().add(Op("paged_attention", _decode_signature, {
    "layout": "q (seqs, heads, d), contiguous caches, int32 CPU tables and lengths",
}, "decode attention over the paged cache"))
PAGED_PREFILL_ATTENTION = registry().add(Op("paged_prefill_attention", _prefill_signature,
                                            summary="prefill over cached + new K/V"))


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
    window: int | None = None,
) -> torch.Tensor:
    """Attention over packed sequences: ``q (total_q, heads, d)``, ``k, v (total_k, kv_heads, d)``,
    ``cu_seqlens_q/k (seqs + 1,)`` int32; returns like ``q``. ``window``: a sliding window
    (query ``i`` sees the ``window`` keys ending at its own position)."""
    fn = ATTENTION_VARLEN.pick(q, k, v, cu_seqlens_q, cu_seqlens_k)
    extra = {} if window is None else {"window": window}
    return fn(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
              causal=causal, softmax_scale=softmax_scale, **extra)


def _attention_varlen_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
                           max_seqlen_q: int, max_seqlen_k: int, causal: bool = True,
                           softmax_scale: float | None = None,
                           window: int | None = None) -> torch.Tensor:
    """Self-attention of packed sequences (``cu_seqlens_q == cu_seqlens_k``) through SDPA:
    one batched call when every sequence has the same length, else one call each; a
    sliding ``window`` as a banded boolean mask."""
    window = check_window(window, causal)
    bounds = cu_seqlens_q.tolist()
    if len(bounds) < 2 or bounds[0] != 0 or bounds[-1] != q.shape[0] or k.shape[0] != q.shape[0]:
        raise ValueError(f"cu_seqlens must run from 0 to total tokens {q.shape[0]}, got {bounds}")
    lengths = [b - a for a, b in zip(bounds, bounds[1:], strict=False)]
    if min(lengths) < 0:
        raise ValueError(f"cu_seqlens must be non-decreasing, got {bounds}")

    def attend(qs: torch.Tensor, ks: torch.Tensor, vs: torch.Tensor) -> torch.Tensor:
        # (batch, len, heads, d) -> SDPA's (batch, heads, len, d) and back
        mask = None
        if window is not None:
            pos = torch.arange(qs.shape[1], device=qs.device)
            gap = pos[:, None] - pos[None, :]
            mask = (gap >= 0) & (gap < window)
        out = F.scaled_dot_product_attention(
            qs.transpose(1, 2), ks.transpose(1, 2), vs.transpose(1, 2), attn_mask=mask,
            is_causal=causal and mask is None, scale=softmax_scale,
            enable_gqa=q.shape[1] != k.shape[1])
        return out.transpose(1, 2)

    if q.shape[0] == 0:
        return torch.empty_like(q)
    if len(set(lengths)) == 1:
        n, length = len(lengths), lengths[0]
        return attend(q.view(n, length, *q.shape[1:]), k.view(n, length, *k.shape[1:]),
                      v.view(n, length, *v.shape[1:])).reshape(q.shape)
    return torch.cat([attend(q[a:b][None], k[a:b][None], v[a:b][None])[0]
                      for a, b in zip(bounds, bounds[1:], strict=False) if b > a])


def store_kv_cache(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Write each token's K/V ``(tokens, kv_heads, d)`` into its slot of the caches
    ``(blocks, block_size, kv_heads, d)``; ``slot_mapping (tokens,)``, −1: skip."""
    STORE_KV_CACHE.pick(k, v, k_cache, v_cache, slot_mapping)(k, v, k_cache, v_cache, slot_mapping)


def _store_kv_cache_cpp(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                        v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    k, v = (t if rows_apart(t) else t.contiguous() for t in (k, v))
    _C.store_kv(k_cache.numpy(), v_cache.numpy(), k.numpy(), v.numpy(),
                slot_mapping.contiguous().numpy())


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    softmax_scale: float | None = None,
    window: int | None = None,
) -> torch.Tensor:
    """Decode attention: one query ``(seqs, heads, d)`` per sequence over its paged cache
    ``(blocks, block_size, kv_heads, d)``; ``block_tables (seqs, max_blocks)``,
    ``context_lens (seqs,)`` int32. ``window``: over the last ``window`` positions only.
    Returns like ``q``."""
    fn = PAGED_ATTENTION.pick(q, k_cache, v_cache, block_tables, context_lens)
    extra = {} if window is None else {"window": window}
    return fn(q, k_cache, v_cache, block_tables, context_lens, softmax_scale=softmax_scale,
              **extra)


def _paged_attention_cpp(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                         block_tables: torch.Tensor, context_lens: torch.Tensor,
                         softmax_scale: float | None = None,
                         window: int | None = None) -> torch.Tensor:
    out = torch.empty(q.shape, dtype=q.dtype)
    scale = resolve_softmax_scale(softmax_scale, q.shape[-1])
    window = check_window(window)
    _C.paged_decode_attention(out.numpy(), q.contiguous().numpy(), k_cache.numpy(),
                              v_cache.numpy(), block_tables.contiguous().numpy(),
                              context_lens.contiguous().numpy(), scale, torch.get_num_threads(),
                              window or 0)
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
    """New tokens ``q (total_q, heads, d)`` attending causally over cached + new K/V
    (already stored); ``context_lens (seqs,)``: each sequence's cached + new length.
    ``window``: each query over the last ``window`` positions up to its own."""
    fn = PAGED_PREFILL_ATTENTION.pick(q, k_cache, v_cache)
    extra = {} if window is None else {"window": window}
    return fn(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, max_seqlen_q,
              softmax_scale=softmax_scale, **extra)


ATTENTION_VARLEN.register("triton", triton_kernel("attention", "flash_attention_varlen"),
                          triton_needs(grad=True), "Triton flash attention, its own backward",
                          auto=on_cuda)
ATTENTION_VARLEN.register("sdpa", _attention_varlen_sdpa, Needs(facts=("self",)),
                          "F.scaled_dot_product_attention per run of equal lengths")
ATTENTION_VARLEN.register("reference", attention_ref.attention_varlen_reference, ANY,
                          "plain PyTorch, materialises the scores")
STORE_KV_CACHE.register("triton", triton_kernel("paged_attention", "store_kv_cache"),
                        triton_needs(grad=False), "Triton kernel", auto=on_cuda)
STORE_KV_CACHE.register("cpp", _store_kv_cache_cpp, cpp_needs(("layout",)),
                        "C++ CPU kernel (_C.store_kv)")
STORE_KV_CACHE.register("reference", paged_ref.store_kv_cache_reference, ANY, "plain PyTorch")
PAGED_ATTENTION.register("triton", triton_kernel("paged_attention", "paged_attention"),
                         triton_needs(grad=False), "Triton split-K decode kernel", auto=on_cuda)
PAGED_ATTENTION.register("cpp", _paged_attention_cpp, cpp_needs(("layout",)),
                         "C++ CPU kernel (_C.paged_decode_attention), reads the blocks in place")
PAGED_ATTENTION.register("reference", paged_ref.paged_attention_reference, ANY,
                         "plain PyTorch, gathers each context")
PAGED_PREFILL_ATTENTION.register("triton",
                                 triton_kernel("paged_attention", "paged_prefill_attention"),
                                 triton_needs(grad=False), "Triton kernel", auto=on_cuda)
PAGED_PREFILL_ATTENTION.register("reference", paged_ref.paged_prefill_attention_reference,
                                 ANY, "plain PyTorch")


# -- rowwise: one query at a time over exactly its own keys, in position order, whether
# the keys come from the sequence (training, prefill) or from the paged cache (decode):
# a token's attention takes the same code path wherever it is computed.

def _attend_one(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """One query ``q (heads, d)`` over its keys ``k, v (L, kv_heads, d)`` -> ``(heads, d)``."""
    group = q.shape[0] // k.shape[1]
    k = k.repeat_interleave(group, dim=1).transpose(0, 1)  # (heads, L, d)
    v = v.repeat_interleave(group, dim=1).transpose(0, 1)
    scores = (q.unsqueeze(1) * k).sum(-1) * scale  # (heads, L)
    p = torch.softmax(scores.float(), dim=-1).to(v.dtype)
    return (p.unsqueeze(-1) * v).sum(1)


def _first_key(end: int, window: int | None) -> int:
    """The first key position a query whose keys end (exclusive) at ``end`` sees."""
    return 0 if window is None else max(0, end - window)


def _attention_varlen_rowwise(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                              cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
                              max_seqlen_q: int, max_seqlen_k: int, causal: bool = True,
                              softmax_scale: float | None = None,
                              window: int | None = None) -> torch.Tensor:
    if not causal:
        raise ValueError("attention_varlen=rowwise covers causal self-attention only "
                         "(causal=True)")
    window = check_window(window, causal)
    scale = resolve_softmax_scale(softmax_scale, q.shape[-1])
    bounds = cu_seqlens_q.tolist()
    outs = [_attend_one(q[t], k[a + _first_key(t + 1 - a, window):t + 1],
                        v[a + _first_key(t + 1 - a, window):t + 1], scale)
            for a, b in zip(bounds, bounds[1:], strict=False) for t in range(a, b)]
    return torch.stack(outs) if outs else torch.empty_like(q)


def _gather(cache: torch.Tensor, table: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """Positions ``[start, end)`` of one sequence from its cache blocks -> ``(end - start,
    kv, d)``; only the blocks holding them are read (blocks before a sliding window may
    have been released, -1 in the table)."""
    size = cache.shape[1]
    first = start // size
    blocks = table[first:-(-end // size)].long()
    return cache[blocks].reshape(-1, *cache.shape[2:])[start - first * size:end - first * size]


def _paged_attention_rowwise(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                             block_tables: torch.Tensor, context_lens: torch.Tensor,
                             softmax_scale: float | None = None,
                             window: int | None = None) -> torch.Tensor:
    window = check_window(window)
    scale = resolve_softmax_scale(softmax_scale, q.shape[-1])
    outs = []
    for i, length in enumerate(context_lens.tolist()):
        if length == 0:
            outs.append(torch.zeros_like(q[i]))
            continue
        start = _first_key(length, window)
        outs.append(_attend_one(q[i], _gather(k_cache, block_tables[i], start, length),
                                _gather(v_cache, block_tables[i], start, length), scale))
    return torch.stack(outs) if outs else torch.empty_like(q)


def _paged_prefill_attention_rowwise(q: torch.Tensor, k_cache: torch.Tensor,
                                     v_cache: torch.Tensor, block_tables: torch.Tensor,
                                     cu_seqlens_q: torch.Tensor, context_lens: torch.Tensor,
                                     max_seqlen_q: int, softmax_scale: float | None = None,
                                     window: int | None = None) -> torch.Tensor:
    window = check_window(window)
    scale = resolve_softmax_scale(softmax_scale, q.shape[-1])
    bounds = cu_seqlens_q.tolist()
    outs = []
    for i, (a, b) in enumerate(zip(bounds, bounds[1:], strict=False)):
        length = int(context_lens[i])
        first = length - (b - a)  # position of the sequence's first new token
        base = _first_key(first + 1, window)  # the first key any of its queries sees
        k = _gather(k_cache, block_tables[i], base, length)
        v = _gather(v_cache, block_tables[i], base, length)
        for t in range(a, b):
            end = first + (t - a) + 1
            start = _first_key(end, window)
            outs.append(_attend_one(q[t], k[start - base:end - base],
                                    v[start - base:end - base], scale))
    return torch.stack(outs) if outs else torch.empty_like(q)


ATTENTION_VARLEN.register("rowwise", _attention_varlen_rowwise, Needs(facts=("self",)),
                          "one query at a time over its own keys: batch-invariant, causal "
                          "only (only when forced)", auto=never)
PAGED_ATTENTION.register("rowwise", _paged_attention_rowwise, ANY,
                         "one query at a time over its gathered keys: batch-invariant "
                         "(only when forced)", auto=never)
PAGED_PREFILL_ATTENTION.register("rowwise", _paged_prefill_attention_rowwise, ANY,
                                 "one query at a time over its gathered keys: "
                                 "batch-invariant (only when forced)", auto=never)
