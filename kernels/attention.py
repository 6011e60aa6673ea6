"""Fused attention (FlashAttention-2 style): forward and backward in Triton.

Packed variable-length sequences are the native layout: ``q: (total_q, heads,
head_dim)``, ``k, v: (total_k, kv_heads, head_dim)`` with int32 ``cu_seqlens``
giving where each sequence starts. Dense ``(batch, seqlen, heads, head_dim)``
inputs are the same problem with uniform lengths. Grouped-query and multi-query
attention (``heads % kv_heads == 0``) read the shared K/V head directly; nothing
is repeated in memory.

Causal masks are aligned to the bottom right: query ``i`` of a sequence attends
key ``j`` when ``j <= i + seqlen_k - seqlen_q`` (the queries are the last
``seqlen_q`` positions). A query row that can see no key (possible only when
``seqlen_q > seqlen_k``) gets a zero output and zero gradients.

Forward: one program per (query block, head, sequence) streams K/V tiles with an
online softmax in base 2 (``log2(e)`` folded into the scale); key blocks past the
diagonal are skipped and the blocks on it are masked in a separate loop. It
stores the log-sum-exp per row for the backward.

Backward: ``delta = rowsum(dO * O)``; one kernel per key block accumulates dK and
dV over query blocks and over the query heads sharing its K/V head; another per
query block accumulates dQ over key blocks. No atomics: results are
deterministic.

Head dims 32, 64, 96 and 128 are supported (96 runs in 128-wide tiles with the
extra lanes masked); other head dims raise ``ValueError``. Inputs may be fp32,
fp16 or bf16; every dot product accumulates in fp32 (fp32 inputs use full-
precision dots, not tf32).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from ._utils import (
    FLOAT_DTYPES,
    check_last_dim_contiguous,
    check_tensor,
    check_triton_device,
    check_window,
    interpreting,
    resolve_softmax_scale,
    tuning_choices,
)
from .reference.attention import attention_reference, attention_varlen_reference

__all__ = [
    "SUPPORTED_HEAD_DIMS",
    "attention_reference",
    "attention_varlen_reference",
    "flash_attention",
    "flash_attention_varlen",
]

SUPPORTED_HEAD_DIMS = (32, 64, 96, 128)
_LOG2E = 1.4426950408889634
_MAX_SEQS = 65535  # sequences ride on the launch grid's third axis


# --------------------------------------------------------------------------- kernels


@triton.jit
def _load_rows(base, rows, stride_t, n_rows, offs_d,
               HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CHECK_ROWS: tl.constexpr):
    """Load a (rows, BLOCK_D) tile; rows >= n_rows and lanes >= HEAD_DIM read as zero."""
    ptrs = base + rows[:, None] * stride_t + offs_d[None, :]
    if CHECK_ROWS:
        if HEAD_DIM == BLOCK_D:
            x = tl.load(ptrs, mask=rows[:, None] < n_rows, other=0.0)
        else:
            x = tl.load(ptrs, mask=(rows[:, None] < n_rows) & (offs_d[None, :] < HEAD_DIM),
                        other=0.0)
    else:
        if HEAD_DIM == BLOCK_D:
            x = tl.load(ptrs)
        else:
            x = tl.load(ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
    return x


@triton.jit
def _store_rows(base, x, rows, stride_t, n_rows, offs_d,
                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    ptrs = base + rows[:, None] * stride_t + offs_d[None, :]
    if HEAD_DIM == BLOCK_D:
        tl.store(ptrs, x, mask=rows[:, None] < n_rows)
    else:
        tl.store(ptrs, x, mask=(rows[:, None] < n_rows) & (offs_d[None, :] < HEAD_DIM))


@triton.jit
def _token_base(PTR, start, stride_t, head, stride_h):
    """Pointer to token ``start``, head ``head`` of a packed (tokens, heads, head_dim) tensor."""
    return PTR + start.to(tl.int64) * stride_t + head * stride_h


@triton.jit
def _seq_span(CU, seq):
    """Start and length of sequence ``seq`` from its cumulative lengths ``CU``."""
    start = tl.load(CU + seq)
    return start, tl.load(CU + seq + 1) - start


@triton.jit
def _key_mask(cols, offs_m, seqlen_k, diag, CAUSAL: tl.constexpr, WINDOW: tl.constexpr):
    """Which (query row, key column) pairs are visible: keys in bounds, at or before the
    diagonal when CAUSAL, and within the sliding window when WINDOW > 0."""
    mask = cols[None, :] < seqlen_k
    if CAUSAL:
        mask = mask & (cols[None, :] <= offs_m[:, None] + diag)
    if WINDOW > 0:
        mask = mask & (cols[None, :] > offs_m[:, None] + diag - WINDOW)
    return mask


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, lo, hi,
               offs_m, offs_n, offs_d, seqlen_k, diag, qk_scale,
               CAUSAL: tl.constexpr, MASKED: tl.constexpr, HEAD_DIM: tl.constexpr,
               BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
               WINDOW: tl.constexpr = 0):
    """Stream key blocks [lo, hi) into the running (acc, l_i, m_i) of one query block.

    MASKED blocks apply the key-bounds, causal and sliding-window (WINDOW > 0) masks;
    a row that is fully masked so far keeps m_i = -inf and contributes nothing.
    """
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        k = _load_rows(k_base, cols, stride_kt, seqlen_k, offs_d, HEAD_DIM, BLOCK_D, MASKED)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        if MASKED:
            qk = tl.where(_key_mask(cols, offs_m, seqlen_k, diag, CAUSAL, WINDOW), qk,
                          float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            m_use = m_new
        p = tl.math.exp2(qk - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_rows(v_base, cols, stride_vt, seqlen_k, offs_d, HEAD_DIM, BLOCK_D, MASKED)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _key_range(start_m, seqlen_k, diag, CAUSAL: tl.constexpr, WINDOW: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Key ranges for one query block: [lo, off_end) needs no mask, [off_end, band_end) does.

    With a sliding window (WINDOW > 0) every visited key block is masked, from the
    block holding the window's first key.
    """
    if CAUSAL:
        off_end = tl.maximum(start_m + diag + 1, 0) // BLOCK_N * BLOCK_N
        band_end = tl.minimum(tl.maximum(start_m + BLOCK_M + diag, 0), seqlen_k)
    else:
        off_end = seqlen_k // BLOCK_N * BLOCK_N
        band_end = seqlen_k
    lo = 0
    if WINDOW > 0:
        lo = tl.maximum(start_m + diag - WINDOW + 1, 0) // BLOCK_N * BLOCK_N
        off_end = lo
    return lo, off_end, band_end


@triton.jit
def _query_block(CU_Q, BLOCK_M: tl.constexpr):
    """(head, seq, q_start, seqlen_q, start_m) of a program over one query block; the
    last query blocks come first, since under a causal mask they visit the most keys."""
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    head = tl.program_id(1)
    seq = tl.program_id(2)
    q_start, seqlen_q = _seq_span(CU_Q, seq)
    return head, seq, q_start, seqlen_q, pid_m * BLOCK_M


@triton.jit
def _query_block_setup(Q, K, V, CU_K, seq, head, q_start, seqlen_q, start_m,
                       stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                       GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """A query block's q tile, its sequence's K/V bases and key length, the diagonal offset
    and the row, key and lane offsets: what the forward and dQ kernels start from."""
    k_start, seqlen_k = _seq_span(CU_K, seq)
    diag = seqlen_k - seqlen_q
    kv_head = head // GROUP
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q_base = _token_base(Q, q_start, stride_qt, head, stride_qh)
    k_base = _token_base(K, k_start, stride_kt, kv_head, stride_kh)
    v_base = _token_base(V, k_start, stride_vt, kv_head, stride_vh)
    q = _load_rows(q_base, offs_m, stride_qt, seqlen_q, offs_d, HEAD_DIM, BLOCK_D, True)
    return q, k_base, v_base, seqlen_k, diag, offs_m, offs_n, offs_d


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, O, LSE, CU_Q, CU_K,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    stride_lse_h, qk_scale, seqlen_key,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    WINDOW: tl.constexpr = 0,
):
    head, seq, q_start, seqlen_q, start_m = _query_block(CU_Q, BLOCK_M)
    if start_m >= seqlen_q:
        return
    q, k_base, v_base, seqlen_k, diag, offs_m, offs_n, offs_d = _query_block_setup(
        Q, K, V, CU_K, seq, head, q_start, seqlen_q, start_m, stride_qt, stride_qh, stride_kt,
        stride_kh, stride_vt, stride_vh, GROUP, HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    lo, off_end, band_end = _key_range(start_m, seqlen_k, diag, CAUSAL, WINDOW, BLOCK_M, BLOCK_N)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt,
                               lo, off_end, offs_m, offs_n, offs_d, seqlen_k, diag, qk_scale,
                               CAUSAL, False, HEAD_DIM, BLOCK_D, BLOCK_N, DOT_PRECISION)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt,
                               off_end, band_end, offs_m, offs_n, offs_d, seqlen_k, diag, qk_scale,
                               CAUSAL, True, HEAD_DIM, BLOCK_D, BLOCK_N, DOT_PRECISION, WINDOW)

    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    acc = acc / l_safe[:, None]
    lse = tl.where(empty, float("inf"), m_i + tl.math.log2(l_safe))
    _store_rows(_token_base(O, q_start, stride_ot, head, stride_oh), acc.to(O.dtype.element_ty),
                offs_m, stride_ot, seqlen_q, offs_d, HEAD_DIM, BLOCK_D)
    tl.store(LSE + head * stride_lse_h + q_start + offs_m, lse, mask=offs_m < seqlen_q)


@triton.jit
def _attn_bwd_delta_kernel(
    O, DO, DELTA, total_q, stride_ot, stride_oh, stride_dot, stride_doh, stride_delta_h,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr,
):
    head = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    o = _load_rows(O + head * stride_oh, rows, stride_ot, total_q, offs_d, HEAD_DIM, BLOCK_D, True)
    do = _load_rows(DO + head * stride_doh, rows, stride_dot, total_q, offs_d, HEAD_DIM, BLOCK_D,
                    True)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + head * stride_delta_h + rows, delta, mask=rows < total_q)


@triton.jit
def _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_qh,
                    stride_dot, stride_doh, stride_lse_h, lo, hi, offs_m, offs_n, offs_d,
                    seqlen_q, diag, qk_scale, GROUP: tl.constexpr,
                    CAUSAL: tl.constexpr, MASKED: tl.constexpr, HEAD_DIM: tl.constexpr,
                    BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, DOT_PRECISION: tl.constexpr,
                    WINDOW: tl.constexpr = 0):
    """Accumulate one key block's dK, dV over query blocks [lo, hi) of each of the GROUP
    query heads sharing its K/V head (one flat loop over (head, block) pairs).

    Works on transposed scores (keys on rows) so no probability tile is transposed.
    """
    n_blocks = tl.maximum(hi - lo + BLOCK_M - 1, 0) // BLOCK_M
    for it in range(0, GROUP * n_blocks):
        g = it // n_blocks
        start_m = lo + (it - g * n_blocks) * BLOCK_M
        rows = start_m + offs_m
        q = _load_rows(q_base + g * stride_qh, rows, stride_qt, seqlen_q, offs_d, HEAD_DIM,
                       BLOCK_D, MASKED)
        do = _load_rows(do_base + g * stride_doh, rows, stride_dot, seqlen_q, offs_d, HEAD_DIM,
                        BLOCK_D, MASKED)
        if MASKED:
            lse = tl.load(lse_base + g * stride_lse_h + rows, mask=rows < seqlen_q,
                          other=float("inf"))
            delta = tl.load(delta_base + g * stride_lse_h + rows, mask=rows < seqlen_q, other=0.0)
        else:
            lse = tl.load(lse_base + g * stride_lse_h + rows)
            delta = tl.load(delta_base + g * stride_lse_h + rows)
        qk_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION)
        p_t = tl.math.exp2(qk_t * qk_scale - lse[None, :])
        if MASKED and CAUSAL:
            p_t = tl.where(offs_n[:, None] <= rows[None, :] + diag, p_t, 0.0)
        if MASKED and WINDOW > 0:
            p_t = tl.where(offs_n[:, None] > rows[None, :] + diag - WINDOW, p_t, 0.0)
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, CU_Q, CU_K,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dkt, stride_dkh, stride_dvt, stride_dvh, stride_lse_h,
    softmax_scale, qk_scale, seqlen_key,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    WINDOW: tl.constexpr = 0,
):
    pid_n = tl.program_id(0)
    kv_head = tl.program_id(1)
    seq = tl.program_id(2)
    k_start, seqlen_k = _seq_span(CU_K, seq)
    start_n = pid_n * BLOCK_N
    if start_n >= seqlen_k:
        return
    q_start, seqlen_q = _seq_span(CU_Q, seq)
    diag = seqlen_k - seqlen_q

    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    k = _load_rows(_token_base(K, k_start, stride_kt, kv_head, stride_kh), offs_n, stride_kt,
                   seqlen_k, offs_d, HEAD_DIM, BLOCK_D, True)
    v = _load_rows(_token_base(V, k_start, stride_vt, kv_head, stride_vh), offs_n, stride_vt,
                   seqlen_k, offs_d, HEAD_DIM, BLOCK_D, True)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    # Query blocks [lo, mid) straddle the diagonal (masked), [mid, full_end) see every key of
    # this block (unmasked), the partial last block [max(mid, full_end), seqlen_q) is masked.
    if CAUSAL:
        lo = tl.maximum(start_n - diag, 0) // BLOCK_M * BLOCK_M
        mid = (tl.maximum(start_n + BLOCK_N - 1 - diag, 0) + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    else:
        lo = 0
        mid = 0
    full_end = seqlen_q // BLOCK_M * BLOCK_M
    band_end = tl.minimum(mid, seqlen_q)
    tail_start = tl.maximum(mid, full_end)
    if WINDOW > 0:  # only the queries whose window reaches this key block, all masked
        band_end = tl.minimum(start_n + BLOCK_N - 1 - diag + WINDOW, seqlen_q)
        full_end = mid
        tail_start = seqlen_q

    head = kv_head * GROUP
    q_base = _token_base(Q, q_start, stride_qt, head, stride_qh)
    do_base = _token_base(DO, q_start, stride_dot, head, stride_doh)
    lse_base = LSE + head * stride_lse_h + q_start
    delta_base = DELTA + head * stride_lse_h + q_start
    dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt,
                             stride_qh, stride_dot, stride_doh, stride_lse_h, lo, band_end,
                             offs_m, offs_n, offs_d, seqlen_q, diag, qk_scale, GROUP, CAUSAL,
                             True, HEAD_DIM, BLOCK_D, BLOCK_M, DOT_PRECISION, WINDOW)
    dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt,
                             stride_qh, stride_dot, stride_doh, stride_lse_h, mid, full_end,
                             offs_m, offs_n, offs_d, seqlen_q, diag, qk_scale, GROUP, CAUSAL,
                             False, HEAD_DIM, BLOCK_D, BLOCK_M, DOT_PRECISION)
    dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt,
                             stride_qh, stride_dot, stride_doh, stride_lse_h, tail_start, seqlen_q,
                             offs_m, offs_n, offs_d, seqlen_q, diag, qk_scale, GROUP, CAUSAL,
                             True, HEAD_DIM, BLOCK_D, BLOCK_M, DOT_PRECISION)

    _store_rows(_token_base(DK, k_start, stride_dkt, kv_head, stride_dkh),
                (dk * softmax_scale).to(DK.dtype.element_ty), offs_n, stride_dkt, seqlen_k,
                offs_d, HEAD_DIM, BLOCK_D)
    _store_rows(_token_base(DV, k_start, stride_dvt, kv_head, stride_dvh),
                dv.to(DV.dtype.element_ty), offs_n, stride_dvt, seqlen_k, offs_d, HEAD_DIM,
                BLOCK_D)


@triton.jit
def _bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, lo, hi,
                  offs_m, offs_n, offs_d, seqlen_k, diag, qk_scale,
                  CAUSAL: tl.constexpr, MASKED: tl.constexpr, HEAD_DIM: tl.constexpr,
                  BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
                  WINDOW: tl.constexpr = 0):
    """Accumulate one query block's dQ over key blocks [lo, hi)."""
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        k = _load_rows(k_base, cols, stride_kt, seqlen_k, offs_d, HEAD_DIM, BLOCK_D, MASKED)
        v = _load_rows(v_base, cols, stride_vt, seqlen_k, offs_d, HEAD_DIM, BLOCK_D, MASKED)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        p = tl.math.exp2(qk * qk_scale - lse[:, None])
        if MASKED:
            p = tl.where(_key_mask(cols, offs_m, seqlen_k, diag, CAUSAL, WINDOW), p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)
    return dq


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, CU_Q, CU_K,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dqt, stride_dqh, stride_lse_h,
    softmax_scale, qk_scale, seqlen_key,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    WINDOW: tl.constexpr = 0,
):
    head, seq, q_start, seqlen_q, start_m = _query_block(CU_Q, BLOCK_M)
    if start_m >= seqlen_q:
        return
    q, k_base, v_base, seqlen_k, diag, offs_m, offs_n, offs_d = _query_block_setup(
        Q, K, V, CU_K, seq, head, q_start, seqlen_q, start_m, stride_qt, stride_qh, stride_kt,
        stride_kh, stride_vt, stride_vh, GROUP, HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N)
    do = _load_rows(_token_base(DO, q_start, stride_dot, head, stride_doh), offs_m, stride_dot,
                    seqlen_q, offs_d, HEAD_DIM, BLOCK_D, True)
    row_ok = offs_m < seqlen_q
    lse = tl.load(LSE + head * stride_lse_h + q_start + offs_m, mask=row_ok, other=float("inf"))
    delta = tl.load(DELTA + head * stride_lse_h + q_start + offs_m, mask=row_ok, other=0.0)

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    lo, off_end, band_end = _key_range(start_m, seqlen_k, diag, CAUSAL, WINDOW, BLOCK_M, BLOCK_N)
    dq = _bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, lo, off_end,
                       offs_m, offs_n, offs_d, seqlen_k, diag, qk_scale, CAUSAL, False,
                       HEAD_DIM, BLOCK_D, BLOCK_N, DOT_PRECISION)
    dq = _bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, off_end,
                       band_end, offs_m, offs_n, offs_d, seqlen_k, diag, qk_scale, CAUSAL, True,
                       HEAD_DIM, BLOCK_D, BLOCK_N, DOT_PRECISION, WINDOW)
    _store_rows(_token_base(DQ, q_start, stride_dqt, head, stride_dqh),
                (dq * softmax_scale).to(DQ.dtype.element_ty), offs_m, stride_dqt, seqlen_q,
                offs_d, HEAD_DIM, BLOCK_D)


# --------------------------------------------------------------------------- autotuning


# (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel, chosen per problem class: 16-bit
# inputs with head_dim <= 64, 16-bit with 96/128 (128-wide tiles), and fp32 with either.
# The 16-bit sets target Hopper (wgmma, 228 KB of shared memory). fp32 keeps full-precision
# dots, which run on CUDA cores (no tensor cores) and hold a whole head_dim row of each
# operand per thread: only small tiles fit in registers, so fp32 runs at reference speed.
# Every set was picked from the sm_90 compiler's register and spill report (kernels/
# compile_table.py): no spills, with or without grouped-query heads. The first config of
# each class is the one LLM_ENGINE_AUTOTUNE=quick launches.
_TUNING: dict[str, dict[str, list[tuple[int, int, int, int]]]] = {
    "fwd": {
        "d64": [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (128, 128, 8, 2),
                (64, 64, 4, 3)],
        "d128": [(128, 64, 8, 3), (128, 128, 8, 2), (128, 64, 8, 4), (64, 64, 4, 3)],
        "fp32_d64": [(32, 32, 4, 2), (16, 16, 4, 2)],
        "fp32_d128": [(16, 16, 4, 2)],
    },
    "dkdv": {
        "d64": [(64, 128, 8, 3), (32, 128, 8, 3), (64, 64, 4, 3), (64, 64, 8, 3)],
        "d128": [(64, 64, 8, 3), (32, 128, 8, 3), (32, 64, 4, 3), (32, 64, 8, 3)],
        "fp32_d64": [(16, 32, 4, 2)],
        "fp32_d128": [(16, 16, 4, 2)],
    },
    "dq": {
        "d64": [(128, 64, 8, 3), (128, 32, 4, 3), (64, 64, 4, 3), (128, 128, 8, 2)],
        "d128": [(128, 64, 8, 3), (128, 32, 8, 3), (64, 64, 8, 3), (128, 64, 8, 2)],
        "fp32_d64": [(32, 32, 4, 2), (16, 16, 4, 2)],
        "fp32_d128": [(16, 16, 4, 2)],
    },
}
_TUNE_KEY = ["seqlen_key", "HEAD_DIM", "CAUSAL", "GROUP"]
_INTERPRETER_CONFIG = triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=1, num_stages=1)


def _problem_class(q_dtype: torch.dtype, block_d: int) -> str:
    width = "d64" if block_d <= 64 else "d128"
    return f"fp32_{width}" if q_dtype == torch.float32 else width


def _entry(config: triton.Config) -> tuple[int, int, int, int]:
    return (config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.num_warps,
            config.num_stages)


def _autotuned(kernel, table: dict[str, list[tuple[int, int, int, int]]]):
    """Autotune ``kernel`` over the configs of its problem class (one config in the interpreter;
    the class's first config under ``LLM_ENGINE_AUTOTUNE=quick``)."""
    if interpreting():
        return triton.autotune([_INTERPRETER_CONFIG], key=_TUNE_KEY)(kernel)
    entries = list(dict.fromkeys(e for cls in table.values() for e in cls))
    configs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
               for bm, bn, w, s in entries]

    def prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
        args = {**named_args, **kwargs}
        wanted = table[_problem_class(args["Q"].dtype, args["BLOCK_D"])]
        return tuning_choices([c for c in configs if _entry(c) in wanted],
                              lambda c: _entry(c) == wanted[0])

    return triton.autotune(configs, key=_TUNE_KEY,
                           prune_configs_by={"early_config_prune": prune})(kernel)


_fwd = _autotuned(_attn_fwd_kernel, _TUNING["fwd"])
_bwd_dkdv = _autotuned(_attn_bwd_dkdv_kernel, _TUNING["dkdv"])
_bwd_dq = _autotuned(_attn_bwd_dq_kernel, _TUNING["dq"])


# --------------------------------------------------------------------------- launchers


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _delta_block_t() -> int:
    return 16 if interpreting() else 64


def _seqlen_key(max_seqlen: int) -> int:
    """Autotuning bucket: the next power of two, so ragged batches reuse tuned configs."""
    return triton.next_power_of_2(max(max_seqlen, 1))


def _forward(q, k, v, cu_q, cu_k, max_seqlen_q, max_seqlen_k, causal, softmax_scale, window=0):
    total_q, heads, head_dim = q.shape
    num_seqs = cu_q.numel() - 1
    o = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty((heads, total_q), device=q.device, dtype=torch.float32)
    if total_q == 0 or max_seqlen_q == 0:
        return o, lse
    grid = lambda meta: (triton.cdiv(max_seqlen_q, meta["BLOCK_M"]), heads, num_seqs)
    _fwd[grid](
        q, k, v, o, lse, cu_q, cu_k,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        o.stride(0), o.stride(1), lse.stride(0),
        softmax_scale * _LOG2E, _seqlen_key(max(max_seqlen_q, max_seqlen_k)),
        GROUP=heads // k.shape[1], HEAD_DIM=head_dim,
        BLOCK_D=triton.next_power_of_2(head_dim), CAUSAL=causal,
        DOT_PRECISION=_dot_precision(q.dtype), WINDOW=window,
    )
    return o, lse


def _backward(do, q, k, v, o, lse, cu_q, cu_k, max_seqlen_q, max_seqlen_k, causal, softmax_scale,
              window=0):
    total_q, heads, head_dim = q.shape
    kv_heads = k.shape[1]
    num_seqs = cu_q.numel() - 1
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    dk = torch.empty_like(k, memory_format=torch.contiguous_format)
    dv = torch.empty_like(v, memory_format=torch.contiguous_format)
    if total_q == 0 or k.shape[0] == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    block_d = triton.next_power_of_2(head_dim)
    delta = torch.empty_like(lse)
    block_t = _delta_block_t()
    _attn_bwd_delta_kernel[(triton.cdiv(total_q, block_t), heads)](
        o, do, delta, total_q, o.stride(0), o.stride(1), do.stride(0), do.stride(1),
        delta.stride(0), HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_T=block_t,
    )
    common = dict(GROUP=heads // kv_heads, HEAD_DIM=head_dim, BLOCK_D=block_d, CAUSAL=causal,
                  DOT_PRECISION=_dot_precision(q.dtype), WINDOW=window)
    seqlen_key = _seqlen_key(max(max_seqlen_q, max_seqlen_k))
    qk_scale = softmax_scale * _LOG2E
    if max_seqlen_k > 0:
        grid_kv = lambda meta: (triton.cdiv(max_seqlen_k, meta["BLOCK_N"]), kv_heads, num_seqs)
        _bwd_dkdv[grid_kv](
            q, k, v, do, lse, delta, dk, dv, cu_q, cu_k,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            do.stride(0), do.stride(1), dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1),
            lse.stride(0), softmax_scale, qk_scale, seqlen_key, **common,
        )
    if max_seqlen_q > 0:
        grid_q = lambda meta: (triton.cdiv(max_seqlen_q, meta["BLOCK_M"]), heads, num_seqs)
        _bwd_dq[grid_q](
            q, k, v, do, lse, delta, dq, cu_q, cu_k,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            do.stride(0), do.stride(1), dq.stride(0), dq.stride(1), lse.stride(0),
            softmax_scale, qk_scale, seqlen_key, **common,
        )
    return dq, dk, dv


class _FlashAttentionVarlen(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu_q, cu_k, max_seqlen_q, max_seqlen_k, causal, softmax_scale,
                window=0):
        o, lse = _forward(q, k, v, cu_q, cu_k, max_seqlen_q, max_seqlen_k, causal, softmax_scale,
                          window)
        ctx.save_for_backward(q, k, v, o, lse, cu_q, cu_k)
        ctx.args = (max_seqlen_q, max_seqlen_k, causal, softmax_scale, window)
        return o

    @staticmethod
    @once_differentiable
    def backward(ctx, do):
        q, k, v, o, lse, cu_q, cu_k = ctx.saved_tensors
        dq, dk, dv = _backward(do.contiguous(), q, k, v, o, lse, cu_q, cu_k, *ctx.args)
        return dq, dk, dv, None, None, None, None, None, None, None


# --------------------------------------------------------------------------- validation


def _check_qkv(q: object, k: object, v: object, layout: str, ndim: int) -> None:
    check_tensor("q", q, dtypes=FLOAT_DTYPES, ndim=ndim)
    check_tensor("k", k, dtypes=(q.dtype,), ndim=ndim, device=q.device)
    check_tensor("v", v, dtypes=(q.dtype,), ndim=ndim, device=q.device)
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_triton_device(name, t)
        check_last_dim_contiguous(name, t)
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got k {tuple(k.shape)} "
                         f"and v {tuple(v.shape)}")
    head_dim = q.shape[-1]
    if head_dim not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"q: head_dim must be one of {SUPPORTED_HEAD_DIMS}, got shape "
                         f"{tuple(q.shape)} ({layout})")
    if k.shape[-1] != head_dim:
        raise ValueError(f"k: head_dim must match q's {head_dim}, got shape {tuple(k.shape)}")
    heads, kv_heads = q.shape[-2], k.shape[-2]
    if kv_heads == 0 or heads % kv_heads != 0:
        raise ValueError(f"k: kv_heads must divide q's heads ({heads}), got k shape "
                         f"{tuple(k.shape)} ({layout})")


def _check_cu_seqlens(name: str, cu: object, total: int, max_name: str, max_seqlen: object,
                      device: torch.device, check_values: bool) -> None:
    check_tensor(name, cu, dtypes=(torch.int32,), ndim=1, device=device)
    if not 2 <= cu.numel() <= _MAX_SEQS + 1:
        raise ValueError(f"{name} must hold num_seqs + 1 offsets with 1 <= num_seqs <= "
                         f"{_MAX_SEQS}, got shape {tuple(cu.shape)}")
    if not isinstance(max_seqlen, int) or isinstance(max_seqlen, bool) or max_seqlen < 0:
        raise ValueError(f"{max_name} must be a non-negative int, got {max_seqlen!r}")
    if not check_values:
        return
    lengths = cu[1:] - cu[:-1]
    first, last, min_len, max_len = torch.stack(
        [cu[0], cu[-1], lengths.min(), lengths.max()]).tolist()
    if first != 0 or min_len < 0:
        raise ValueError(f"{name} must start at 0 and never decrease, got {cu.tolist()}")
    if last != total:
        raise ValueError(f"{name} must end at the number of packed tokens {total}, got {last}")
    if max_len > max_seqlen:
        raise ValueError(f"{max_name}={max_seqlen} is less than the longest sequence in "
                         f"{name} ({max_len})")


# --------------------------------------------------------------------------- public API


def flash_attention_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    causal: bool = True,
    softmax_scale: float | None = None,
    *,
    check_cu_seqlens: bool = True,
    window: int | None = None,
) -> torch.Tensor:
    """Attention over packed variable-length sequences (Triton, differentiable).

    Args:
        q: ``(total_q, heads, head_dim)`` fp32/fp16/bf16, head_dim in 32/64/96/128.
        k, v: ``(total_k, kv_heads, head_dim)``, q's dtype and device; ``heads % kv_heads == 0``.
        cu_seqlens_q, cu_seqlens_k: ``(num_seqs + 1,)`` int32 cumulative lengths starting at 0
            and ending at ``total_q`` / ``total_k``.
        max_seqlen_q, max_seqlen_k: the longest query / key sequence (sizes the launch grid).
        causal: bottom-right aligned per sequence: query ``i`` sees key
            ``j <= i + seqlen_k - seqlen_q``.
        softmax_scale: defaults to ``1 / sqrt(head_dim)``.
        check_cu_seqlens: read ``cu_seqlens`` back to the host to check their values (one
            device synchronization); pass False when the caller has already checked them.
        window: a sliding window (causal only): query ``i`` also sees no key
            ``j <= i + seqlen_k - seqlen_q - window``; None for none.

    Returns:
        ``(total_q, heads, head_dim)`` in q's dtype.
    """
    _check_qkv(q, k, v, "(total, heads, head_dim)", 3)
    _check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[0], "max_seqlen_q", max_seqlen_q,
                      q.device, check_cu_seqlens)
    _check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, k.shape[0], "max_seqlen_k", max_seqlen_k,
                      q.device, check_cu_seqlens)
    if cu_seqlens_k.numel() != cu_seqlens_q.numel():
        raise ValueError(f"cu_seqlens_k must have the same shape as cu_seqlens_q "
                         f"{tuple(cu_seqlens_q.shape)}, got {tuple(cu_seqlens_k.shape)}")
    scale = resolve_softmax_scale(softmax_scale, q.shape[-1])
    window = check_window(window, causal)
    return _FlashAttentionVarlen.apply(q, k, v, cu_seqlens_q.contiguous(),
                                       cu_seqlens_k.contiguous(), max_seqlen_q, max_seqlen_k,
                                       bool(causal), scale, window or 0)


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    softmax_scale: float | None = None,
    window: int | None = None,
) -> torch.Tensor:
    """Attention over a dense batch (Triton, differentiable).

    Args:
        q: ``(batch, seqlen_q, heads, head_dim)`` fp32/fp16/bf16, head_dim in 32/64/96/128.
        k, v: ``(batch, seqlen_k, kv_heads, head_dim)``, q's dtype and device;
            ``heads % kv_heads == 0``.
        causal: bottom-right aligned: query ``i`` sees key ``j <= i + seqlen_k - seqlen_q``.
        softmax_scale: defaults to ``1 / sqrt(head_dim)``.
        window: a sliding window (causal only), as in :func:`flash_attention_varlen`.

    Returns:
        ``(batch, seqlen_q, heads, head_dim)`` in q's dtype.
    """
    window = check_window(window, causal)
    _check_qkv(q, k, v, "(batch, seqlen, heads, head_dim)", 4)
    if k.shape[0] != q.shape[0]:
        raise ValueError(f"k must have q's batch size {q.shape[0]}, got shape {tuple(k.shape)}")
    if q.shape[0] > _MAX_SEQS:
        raise ValueError(f"q: batch must be at most {_MAX_SEQS}, got shape {tuple(q.shape)}")
    scale = resolve_softmax_scale(softmax_scale, q.shape[-1])
    batch, seqlen_q, heads, head_dim = q.shape
    seqlen_k, kv_heads = k.shape[1], k.shape[2]
    steps = torch.arange(batch + 1, device=q.device, dtype=torch.int32)
    out = _FlashAttentionVarlen.apply(
        q.reshape(batch * seqlen_q, heads, head_dim),
        k.reshape(batch * seqlen_k, kv_heads, head_dim),
        v.reshape(batch * seqlen_k, kv_heads, head_dim),
        steps * seqlen_q, steps * seqlen_k, seqlen_q, seqlen_k, bool(causal), scale, window or 0,
    )
    return out.view(batch, seqlen_q, heads, head_dim)
