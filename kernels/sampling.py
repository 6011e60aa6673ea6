"""Fused softmax-sampling: temperature, top-k, top-p and min-p without sorting.

``sample`` turns a batch of logits into one token per row in a few streaming
passes over the vocabulary, one program per row (or per tile of rows when the
vocabulary is small, as under the interpreter):

1. max, sum of exponentials (online softmax), argmax, the maximum of every
   block of the vocabulary, and a NaN check;
2. the top-k, then the top-p cut-off, each by a bracketed multi-pivot search:
   a pass counts the tokens and sums the probability mass at or above
   ``PIVOTS`` pivots at once and keeps the sub-interval where the cut-off
   lies. Half the pivots are spread evenly in value (fast on real logits),
   half evenly in the bits of the float (an exact answer after a bounded
   number of passes), and each pass also shrinks the interval to the data it
   holds, so the search stops once the interval holds a single value. Blocks
   whose maximum lies below the interval are skipped. As soon as at most
   ``CAP`` tokens lie at or above the interval, they are copied (key and token
   id, in token order) to a per-row candidate list and the search finishes
   there. Ties at the cut-off are resolved by token id: a tie quota says how
   many of the tied tokens (lowest ids first) survive;
3. sampling by inverse CDF inside each block of the candidate list (or of the
   vocabulary, for rows whose kept set is larger than ``CAP`` or that filter
   with min-p only), combined across blocks by weighted reservoir sampling,
   with min-p applied on the fly; the random numbers come from Philox keyed by
   (seed, step, stream, block).

Filter semantics (shared with the references, ``reference/sampling.py``): scale logits by
``1/temperature``; top-k keeps the ``k`` largest (ties toward lower token ids,
so exactly ``k`` survive); top-p keeps the smallest set of most likely top-k
survivors whose renormalised probability reaches ``p`` (same tie order); min-p
keeps survivors whose probability is at least ``min_p`` times the largest;
the token is drawn from the renormalised survivors. ``temperature == 0`` is
greedy (the lowest id among the largest logits).

Random numbers: with a scalar (or drawn) seed, row ``r`` uses the stream
``(seed, step, r)``; with a ``(batch,)`` seed tensor, a row uses
``(seed[r], step[r])`` alone, so a request gets the same tokens wherever it
sits in the batch. Block size and candidate capacity depend only on the
vocabulary size and the device kind, never on the batch, so the same inputs
give the same tokens on the same device.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import check_last_dim_contiguous, check_triton_device, interpreting
from .reference.sampling import (
    _INT32_MAX,
    _validate,
    filtered_probs_reference,
    sample_reference,
)

__all__ = ["filtered_probs_reference", "sample", "sample_reference"]

_LOG2E = tl.constexpr(1.4426950408889634)
_LN2 = tl.constexpr(0.6931471805599453)
_I32_MAX = tl.constexpr(_INT32_MAX)  # the same, readable inside kernels
_MAX_PASSES = 24  # pivot-search passes per filter (each cuts the key range at least 9-fold)


# --------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------


@triton.jit
def _float_key(y):
    """Order-preserving map of float32 to int32 (-0.0 and +0.0 share key 0)."""
    b = y.to(tl.int32, bitcast=True)
    return tl.where(b >= 0, b, (b ^ 0x7FFFFFFF) + 1)


@triton.jit
def _key_float(k):
    """Inverse of ``_float_key``."""
    b = tl.where(k >= 0, k, (k - 1) ^ 0x7FFFFFFF)
    return b.to(tl.float32, bitcast=True)


@triton.jit
def _block(row_base, row_ok, vocab, scale, cand_key, cand_idx, n_cand, start, cols0,
           FROM_CAND: tl.constexpr):
    """One block of each row's tokens: ``(key, y, token id, valid)``, each ``(ROWS, BLOCK)``.

    From the logits (``y = x * scale``, fp32), or from the row's compacted
    candidate list (keys and token ids, in token order).
    """
    offs = start + cols0
    if FROM_CAND:
        valid = row_ok[:, None] & (offs[None, :] < n_cand[:, None])
        key = tl.load(cand_key[:, None] + offs[None, :], mask=valid, other=-_I32_MAX - 1)
        idx = tl.load(cand_idx[:, None] + offs[None, :], mask=valid, other=0)
        y = _key_float(key)
    else:
        valid = row_ok[:, None] & (offs < vocab)[None, :]
        x = tl.load(row_base + offs[None, :], mask=valid, other=float("-inf")).to(tl.float32)
        y = x * scale[:, None]
        key = _float_key(y)
        idx = offs[None, :] + tl.zeros_like(key)
    return key, y, idx, valid


@triton.jit
def _block_needed(rows_in, lo, bmax_row, n_cand, start, BLOCK: tl.constexpr,
                  FROM_CAND: tl.constexpr):
    """Whether any row of ``rows_in`` may hold a key ``>= lo`` in the block at ``start``."""
    if FROM_CAND:
        need = rows_in & (start < n_cand)
    else:
        block_y = tl.load(bmax_row + start // BLOCK, mask=rows_in, other=float("-inf"))
        need = rows_in & (_float_key(block_y) >= lo)
    return tl.max(need.to(tl.int32)) > 0


@triton.jit
def _search(row_base, row_ok, vocab, scale, m, y_floor, bmax_row, cand_key, cand_idx, n_cand,
            active, lo, hi, cnt_lo, cnt_hi, mass_hi, k_lim, p_mass, stop_count, length,
            FROM_CAND: tl.constexpr, COUNT: tl.constexpr, MASS: tl.constexpr,
            ROWS: tl.constexpr, BLOCK: tl.constexpr, PIVOTS: tl.constexpr,
            MAX_PASSES: tl.constexpr):
    """Largest data key ``t`` with ``count(key >= t) >= k_lim or mass(key >= t) >= p_mass``.

    Invariant: the predicate holds at ``lo`` and fails at ``hi``; ``cnt_lo`` is
    the count at ``lo``, ``cnt_hi``/``mass_hi`` count and mass at ``hi`` (counts
    tracked only when ``COUNT``, mass only when ``MASS``). A row of ``active`` is
    searched while ``hi - lo > 1`` and ``cnt_lo > stop_count``. Each pass counts
    and weighs the tokens at or above ``PIVOTS`` pivots in ``(lo, hi)`` at once,
    keeps the sub-interval where the predicate flips, and shrinks it to the data
    it holds. Blocks without a key ``>= lo`` are skipped. Returns the updated
    ``(lo, hi, cnt_lo, cnt_hi, mass_hi)``; once settled, ``t = lo``.
    """
    HALF: tl.constexpr = PIVOTS // 2
    j = tl.arange(0, PIVOTS)
    by_value = j < HALF
    frac = tl.where(by_value, j + 1, j - HALF + 1).to(tl.float32) / (HALF + 1)
    cols0 = tl.arange(0, BLOCK)
    open_rows = active & (hi.to(tl.int64) - lo > 1) & (cnt_lo > stop_count)
    passes = 0
    while (tl.max(open_rows.to(tl.int32)) > 0) & (passes < MAX_PASSES):
        # Half the pivots evenly in value (fast on real logits), half evenly in
        # the key's bits (at least a (HALF+1)-fold cut of the key range per pass).
        lo64 = lo.to(tl.int64)
        span = hi.to(tl.int64) - lo64
        piv_bits = lo64[:, None] + (span[:, None] * (j + 1 - HALF)[None, :]) // (HALF + 1)
        lo_v = tl.maximum(_key_float(lo), y_floor)
        hi_v = _key_float(hi - 1)
        piv_val = _float_key(lo_v[:, None] + (hi_v - lo_v)[:, None] * frac[None, :])
        piv = tl.where(by_value[None, :], piv_val.to(tl.int64), piv_bits)
        piv = tl.minimum(tl.maximum(piv, lo64[:, None] + 1), hi.to(tl.int64)[:, None] - 1)
        piv = piv.to(tl.int32)
        cnt = tl.zeros([ROWS, PIVOTS], dtype=tl.int32)
        mass = tl.zeros([ROWS, PIVOTS], dtype=tl.float32)
        kmin = tl.full([ROWS], _I32_MAX, dtype=tl.int32)
        kmax = tl.full([ROWS], -_I32_MAX, dtype=tl.int32)
        for start in range(0, length, BLOCK):
            if _block_needed(open_rows, lo, bmax_row, n_cand, start, BLOCK, FROM_CAND):
                key, y, idx, valid = _block(row_base, row_ok, vocab, scale, cand_key, cand_idx,
                                            n_cand, start, cols0, FROM_CAND)
                ge = key[:, :, None] >= piv[:, None, :]  # padding keys lie below every pivot
                if COUNT:
                    cnt += tl.sum(ge.to(tl.int32), axis=1)
                if MASS:
                    w = tl.exp2(y - m[:, None])
                    mass += tl.sum(tl.where(ge, w[:, :, None], 0.0), axis=1)
                inside = valid & (key >= lo[:, None]) & (key < hi[:, None])
                kmin = tl.minimum(kmin, tl.min(tl.where(inside, key, _I32_MAX), axis=1))
                kmax = tl.maximum(kmax, tl.max(tl.where(inside, key, -_I32_MAX), axis=1))
        enough = (cnt >= k_lim[:, None]) | (mass >= p_mass[:, None])
        new_lo = tl.maximum(tl.max(tl.where(enough, piv, lo[:, None]), axis=1), lo)
        new_hi = tl.minimum(tl.min(tl.where(enough, hi[:, None], piv), axis=1), hi)
        at_lo = piv == new_lo[:, None]
        at_hi = piv == new_hi[:, None]
        new_cnt_lo = tl.where(new_lo == lo, cnt_lo, tl.max(tl.where(at_lo, cnt, 0), axis=1))
        new_cnt_hi = tl.where(new_hi == hi, cnt_hi, tl.max(tl.where(at_hi, cnt, 0), axis=1))
        new_mass_hi = tl.where(new_hi == hi, mass_hi,
                               tl.max(tl.where(at_hi, mass, 0.0), axis=1))
        cnt_lo = tl.where(open_rows, new_cnt_lo, cnt_lo)
        cnt_hi = tl.where(open_rows, new_cnt_hi, cnt_hi)
        mass_hi = tl.where(open_rows, new_mass_hi, mass_hi)
        # No data lies in [lo, kmin) or (kmax, hi): shrink to the data without changing counts.
        lo = tl.where(open_rows, tl.maximum(new_lo, kmin), lo)
        hi = tl.where(open_rows, tl.minimum(new_hi, kmax.to(tl.int64) + 1).to(tl.int32), hi)
        open_rows = open_rows & (hi.to(tl.int64) - lo > 1) & (cnt_lo > stop_count)
        passes += 1
    return lo, hi, cnt_lo, cnt_hi, mass_hi


@triton.jit
def _compact(row_base, row_ok, vocab, scale, bmax_row, cand_key, cand_idx, which, lo,
             ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """Copy the tokens with key ``>= lo`` of the rows in ``which`` to their candidate
    lists (key and token id, in token order); returns how many each row wrote."""
    cols0 = tl.arange(0, BLOCK)
    n = tl.zeros([ROWS], dtype=tl.int32)
    for start in range(0, vocab, BLOCK):
        if _block_needed(which, lo, bmax_row, n, start, BLOCK, False):
            key, y, idx, valid = _block(row_base, row_ok, vocab, scale, cand_key, cand_idx, n,
                                        start, cols0, False)
            sel = valid & which[:, None] & (key >= lo[:, None])
            s = sel.to(tl.int32)
            pos = n[:, None] + tl.cumsum(s, axis=1) - s
            tl.store(cand_key[:, None] + pos, key, mask=sel)
            tl.store(cand_idx[:, None] + pos, idx, mask=sel)
            n += tl.sum(s, axis=1)
    return n


@triton.jit
def _stage(row_base, row_ok, vocab, scale, m, y_floor, key_m, bmax_row, cand_key, cand_idx,
           n_cand, compacted, active, lo, cnt_lo, k_lim, p_mass,
           COUNT_CAND: tl.constexpr, MASS: tl.constexpr, CAP: tl.constexpr,
           ROWS: tl.constexpr, BLOCK: tl.constexpr, PIVOTS: tl.constexpr,
           MAX_PASSES: tl.constexpr):
    """One filter's cut-off for the rows in ``active``, searching up from ``lo``.

    Rows not yet compacted search the logits until at most ``CAP`` tokens lie
    at or above ``lo`` (or the cut-off is exact), and are then compacted; the
    search finishes on the candidate lists, which hold every token above
    ``lo``. Returns ``(t, count above t, mass above t, cnt_lo, compacted, n_cand)``.
    """
    hi = tl.where(active, key_m + 1, lo + 1)
    zero_cnt = tl.zeros([ROWS], dtype=tl.int32)
    zero_mass = tl.zeros([ROWS], dtype=tl.float32)
    lo, hi, cnt_lo, cnt_hi, mass_hi = _search(
        row_base, row_ok, vocab, scale, m, y_floor, bmax_row, cand_key, cand_idx, n_cand,
        active & ~compacted, lo, hi, cnt_lo, zero_cnt, zero_mass, k_lim, p_mass, CAP, vocab,
        False, True, MASS, ROWS, BLOCK, PIVOTS, MAX_PASSES)
    newly = active & ~compacted & (cnt_lo <= CAP)
    if tl.max(newly.to(tl.int32)) > 0:
        n_new = _compact(row_base, row_ok, vocab, scale, bmax_row, cand_key, cand_idx, newly,
                         lo, ROWS, BLOCK)
        n_cand = tl.where(newly, n_new, n_cand)
        compacted = compacted | newly
    lo, hi, cnt_lo, cnt_hi, mass_hi = _search(
        row_base, row_ok, vocab, scale, m, y_floor, bmax_row, cand_key, cand_idx, n_cand,
        active & compacted, lo, hi, cnt_lo, cnt_hi, mass_hi, k_lim, p_mass, -1, CAP,
        True, COUNT_CAND, MASS, ROWS, BLOCK, PIVOTS, MAX_PASSES)
    return lo, cnt_hi, mass_hi, cnt_lo, compacted, n_cand


@triton.jit
def _uniform(r):
    """uint32 -> float32 uniform in [0, 1) with 24 random bits."""
    return (r >> 8).to(tl.float32) * (1.0 / 16777216.0)


@triton.jit
def _draw(row_base, row_ok, vocab, scale, m, bmax_row, cand_key, cand_idx, n_cand, rows_in,
          t_key, quota, min_p, seed, step_lo, step_hi, stream, length,
          FROM_CAND: tl.constexpr, HAS_MIN_P: tl.constexpr, ROWS: tl.constexpr,
          BLOCK: tl.constexpr):
    """Sample a kept token for each row of ``rows_in``: inverse CDF inside each block
    with one uniform, weighted reservoir sampling across blocks with another
    (both from Philox keyed by seed, step, stream and block). Returns the token
    id, or -1 where nothing was kept."""
    cols0 = tl.arange(0, BLOCK)
    pick = tl.full([ROWS], -1, dtype=tl.int32)
    seen = tl.zeros([ROWS], dtype=tl.float32)
    tie_seen = tl.zeros([ROWS], dtype=tl.int32)
    for start in range(0, length, BLOCK):
        useful = rows_in
        if HAS_MIN_P and not FROM_CAND:
            block_y = tl.load(bmax_row + start // BLOCK, mask=rows_in, other=float("-inf"))
            useful = useful & (tl.exp2(block_y - m) >= min_p)
        if _block_needed(useful, t_key, bmax_row, n_cand, start, BLOCK, FROM_CAND):
            key, y, idx, valid = _block(row_base, row_ok, vocab, scale, cand_key, cand_idx,
                                        n_cand, start, cols0, FROM_CAND)
            w = tl.exp2(y - m[:, None])
            tie = (valid & (key == t_key[:, None])).to(tl.int32)
            tie_rank = tie_seen[:, None] + tl.cumsum(tie, axis=1) - tie
            tie_seen += tl.sum(tie, axis=1)
            kept = (key > t_key[:, None]) | ((tie == 1) & (tie_rank < quota[:, None]))
            kept = kept & valid & rows_in[:, None] & (w > 0.0)
            if HAS_MIN_P:
                kept = kept & (w >= min_p[:, None])
            wk = tl.where(kept, w, 0.0)
            block_mass = tl.sum(wk, axis=1)
            cdf = tl.cumsum(wk, axis=1)
            block_id = (seed * 0 + start // BLOCK).to(tl.uint32)
            r0, r1, _r2, _r3 = tl.philox(seed, block_id, step_lo, step_hi, stream)
            target = _uniform(r0) * block_mass
            at = tl.min(tl.where(cdf > target[:, None], cols0[None, :], BLOCK), axis=1)
            last = tl.max(tl.where(kept, cols0[None, :], -1), axis=1)
            at = tl.where(at == BLOCK, last, at)
            chosen = tl.sum(tl.where(cols0[None, :] == at[:, None], idx, 0), axis=1)
            earlier = seen
            seen += block_mass
            take = (block_mass > 0.0) & ((earlier == 0.0) | (_uniform(r1) * seen < block_mass))
            pick = tl.where(take, chosen, pick)
    return pick


@triton.jit
def _sampling_kernel(
    logits_ptr, stride_row, batch, vocab,
    temp_ptr, top_k_ptr, top_p_ptr, min_p_ptr, seed_ptr, step_ptr,
    tokens_ptr, logprobs_ptr, status_ptr, bmax_ptr, n_blocks, cand_key_ptr, cand_idx_ptr,
    HAS_TOP_K: tl.constexpr, HAS_TOP_P: tl.constexpr, HAS_MIN_P: tl.constexpr,
    SEED_PER_ROW: tl.constexpr, WANT_LOGPROBS: tl.constexpr,
    ROWS: tl.constexpr, BLOCK: tl.constexpr, PIVOTS: tl.constexpr, CAP: tl.constexpr,
    MAX_PASSES: tl.constexpr,
):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < batch
    cols0 = tl.arange(0, BLOCK)
    row_base = logits_ptr + rows.to(tl.int64)[:, None] * stride_row
    bmax_row = bmax_ptr + rows.to(tl.int64) * n_blocks  # per-block max of y, written in pass 1
    cand_key = cand_key_ptr + rows.to(tl.int64) * CAP
    cand_idx = cand_idx_ptr + rows.to(tl.int64) * CAP
    temp = tl.load(temp_ptr + rows, mask=row_ok, other=1.0)
    greedy = temp == 0.0
    scale = tl.where(greedy, 1.0, 1.0 / temp) * _LOG2E  # work in log2 units

    # Pass 1: max, sum of exp2 (online), raw argmax, block maxima, finite range, NaN check.
    m = tl.full([ROWS], float("-inf"), dtype=tl.float32)
    z = tl.zeros([ROWS], dtype=tl.float32)
    y_floor = tl.full([ROWS], float("inf"), dtype=tl.float32)
    best = tl.full([ROWS], float("-inf"), dtype=tl.float32)
    best_idx = tl.zeros([ROWS], dtype=tl.int32)
    bad = tl.zeros([ROWS], dtype=tl.int32)
    n_finite = tl.zeros([ROWS], dtype=tl.int32)
    m_raw = tl.full([ROWS], float("-inf"), dtype=tl.float32)
    z_raw = tl.zeros([ROWS], dtype=tl.float32)
    for start in range(0, vocab, BLOCK):
        cols = start + cols0
        mask = row_ok[:, None] & (cols < vocab)[None, :]
        x = tl.load(row_base + cols[None, :], mask=mask, other=float("-inf")).to(tl.float32)
        y = x * scale[:, None]
        bad = tl.maximum(bad, tl.max((x != x).to(tl.int32), axis=1))
        bx, bi = tl.max(x, axis=1, return_indices=True, return_indices_tie_break_left=True)
        better = bx > best
        best = tl.where(better, bx, best)
        best_idx = tl.where(better, start + bi, best_idx)
        finite = y > float("-inf")
        y_floor = tl.minimum(y_floor, tl.min(tl.where(finite, y, float("inf")), axis=1))
        n_finite += tl.sum(finite.to(tl.int32), axis=1)
        block_max = tl.max(y, axis=1)
        tl.store(bmax_row + start // BLOCK, block_max, mask=row_ok)
        new_m = tl.maximum(m, block_max)
        ref = tl.where(new_m == float("-inf"), 0.0, new_m)
        z = z * tl.exp2(m - ref) + tl.sum(tl.exp2(y - ref[:, None]), axis=1)
        m = new_m
        if WANT_LOGPROBS:
            yr = x * _LOG2E
            new_mr = tl.maximum(m_raw, tl.max(yr, axis=1))
            ref_r = tl.where(new_mr == float("-inf"), 0.0, new_mr)
            z_raw = z_raw * tl.exp2(m_raw - ref_r) + tl.sum(tl.exp2(yr - ref_r[:, None]), axis=1)
            m_raw = new_mr
    tl.debug_barrier()  # the block maxima are read back by other threads below
    bad = tl.where(m == float("-inf"), 2, bad)
    tl.store(status_ptr + rows, bad, mask=row_ok)
    sampling = row_ok & ~greedy & (bad == 0)
    m = tl.where(bad == 0, m, 0.0)  # keeps padding rows of a tile free of inf - inf
    y_floor = tl.where(bad == 0, y_floor, 0.0)

    # Pass 2: the cut-off key ``t_key`` and how many tokens tied at it survive.
    key_m = _float_key(m)
    t_key = tl.full([ROWS], -_I32_MAX - 1, dtype=tl.int32)  # below every key: keep all
    quota = tl.zeros([ROWS], dtype=tl.int32)
    no_p = tl.full([ROWS], float("inf"), dtype=tl.float32)
    no_k = tl.full([ROWS], _I32_MAX, dtype=tl.int32)
    total = z
    lo = _float_key(y_floor)  # the predicates hold at the smallest finite value
    cnt_lo = n_finite
    compacted = sampling & False
    n_cand = tl.zeros([ROWS], dtype=tl.int32)
    on_k = sampling & False
    quota_k = no_k
    if HAS_TOP_K:
        k = tl.load(top_k_ptr + rows, mask=row_ok, other=0)
        on_k = sampling & (k > 0) & (k < n_finite)  # else every finite token survives
        t_k, cnt_hi, mass_hi, cnt_lo, compacted, n_cand = _stage(
            row_base, row_ok, vocab, scale, m, y_floor, key_m, bmax_row, cand_key, cand_idx,
            n_cand, compacted, on_k, lo, cnt_lo, tl.where(on_k, k, no_k), no_p,
            True, HAS_TOP_P, CAP, ROWS, BLOCK, PIVOTS, MAX_PASSES)
        quota_k = tl.where(on_k, k - cnt_hi, no_k)
        w_t = tl.exp2(_key_float(t_k) - m)
        total = tl.where(on_k, mass_hi + quota_k.to(tl.float32) * w_t, z)
        lo = tl.where(on_k, t_k, lo)
        t_key = tl.where(on_k, t_k, t_key)
        quota = tl.where(on_k, quota_k, quota)
    if HAS_TOP_P:
        p = tl.load(top_p_ptr + rows, mask=row_ok, other=1.0)
        on_p = sampling & (p < 1.0)
        p_mass = tl.where(on_p, p * total, no_p)
        # Above the top-k cut-off fewer than k tokens remain, so mass alone decides.
        t_p, _cnt_hi, mass_hi, cnt_lo, compacted, n_cand = _stage(
            row_base, row_ok, vocab, scale, m, y_floor, key_m, bmax_row, cand_key, cand_idx,
            n_cand, compacted, on_p, lo, cnt_lo, no_k, p_mass,
            False, True, CAP, ROWS, BLOCK, PIVOTS, MAX_PASSES)
        w_t = tl.exp2(_key_float(t_p) - m)
        need = tl.minimum(tl.maximum(tl.ceil((p_mass - mass_hi) / w_t), 1.0), vocab * 1.0)
        quota_p = tl.where(on_k & (t_p == t_key), tl.minimum(need.to(tl.int32), quota_k),
                           need.to(tl.int32))
        t_key = tl.where(on_p, t_p, t_key)
        quota = tl.where(on_p, quota_p, quota)

    # Pass 3: draw, from the candidate lists where the rows have them.
    min_p = tl.zeros([ROWS], dtype=tl.float32)
    if HAS_MIN_P:
        min_p = tl.load(min_p_ptr + rows, mask=row_ok, other=0.0)
    seed = tl.load(seed_ptr + rows, mask=row_ok, other=0)
    step = tl.load(step_ptr + rows, mask=row_ok, other=0)
    step_lo = (step & 0xFFFFFFFF).to(tl.uint32)
    step_hi = ((step >> 32) & 0xFFFFFFFF).to(tl.uint32)
    stream = (rows * (1 - SEED_PER_ROW)).to(tl.uint32)  # per-row seeds: one stream per seed
    pick = tl.full([ROWS], -1, dtype=tl.int32)
    from_logits = sampling & ~compacted
    if tl.max(from_logits.to(tl.int32)) > 0:
        pick = _draw(row_base, row_ok, vocab, scale, m, bmax_row, cand_key, cand_idx, n_cand,
                     from_logits, t_key, quota, min_p, seed, step_lo, step_hi, stream, vocab,
                     False, HAS_MIN_P, ROWS, BLOCK)
    from_cand = sampling & compacted
    if tl.max(from_cand.to(tl.int32)) > 0:
        pick_c = _draw(row_base, row_ok, vocab, scale, m, bmax_row, cand_key, cand_idx, n_cand,
                       from_cand, t_key, quota, min_p, seed, step_lo, step_hi, stream, CAP,
                       True, HAS_MIN_P, ROWS, BLOCK)
        pick = tl.where(from_cand, pick_c, pick)
    token = tl.where(sampling & (pick >= 0), pick, best_idx)
    tl.store(tokens_ptr + rows, token.to(tl.int64), mask=row_ok)
    if WANT_LOGPROBS:
        x_tok = tl.load(row_base + token[:, None], mask=row_ok[:, None], other=0.0).to(tl.float32)
        lse = m_raw + tl.log2(z_raw)
        logprob = (tl.sum(x_tok, axis=1) * _LOG2E - lse) * _LN2
        tl.store(logprobs_ptr + rows, logprob, mask=row_ok)


# --------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------


def _launch_config(batch: int, vocab: int, device: torch.device, search: bool
                   ) -> tuple[int, int, int, int, dict[str, int]]:
    """(rows per program, block, candidate capacity, pivots per pass, launch options);
    ``search``: the launch filters by top-k or top-p (the pivot search runs).

    Block and capacity depend only on the vocabulary size and the device kind,
    never on the batch, so a row's token does not depend on its neighbours.
    Under the interpreter a program takes a tile of rows, and blocks are a
    quarter of the vocabulary and the capacity two blocks, so that small test
    vocabularies cover several blocks, block skipping, and both the candidate
    and the full-vocabulary path.
    """
    if interpreting() and device.type == "cpu":
        block = min(max(triton.next_power_of_2(vocab) // 4, 8), 256)
        rows = min(triton.next_power_of_2(batch), max(1, 65536 // block))
        return rows, block, 2 * block, 16, {"num_warps": 1}
    block = min(triton.next_power_of_2(vocab), 1024)
    # The pivot search holds a (BLOCK, PIVOTS) tile: over 8 warps it needs more than 128
    # registers a thread and spilled under a 128-register cap, so it takes 16 warps.
    # Without it, 16 warps spilled a few bytes under Triton 3.6 and 8 do not.
    return 1, block, 4 * block, 16, {"num_warps": 16 if search else 8}


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
    """Sample one token per row with temperature, top-k, top-p and min-p (Triton).

    Args:
        logits: ``(batch, vocab)`` fp32/fp16/bf16, contiguous in the last dim;
            ``-inf`` marks masked tokens (never sampled).
        temperature: scalar or ``(batch,)``; ``0`` on a row means greedy.
        top_k: scalar or ``(batch,)`` int; ``0``/``None`` = off.
        top_p: scalar or ``(batch,)`` in (0, 1]; ``1``/``None`` = off.
        min_p: scalar or ``(batch,)`` in [0, 1]; ``0``/``None`` = off.
        seed: int, or ``(batch,)`` int tensor of per-request seeds; ``None``
            draws one from torch's default generator (follows ``torch.manual_seed``).
        step: int or ``(batch,)`` int tensor, the index of the token being
            generated, so every decode step gets fresh random numbers.
        return_logprobs: also return the log-probability of each sampled token.

    Returns:
        ``tokens: (batch,) int64``, and with ``return_logprobs`` also
        ``logprobs: (batch,) fp32``, the log-softmax of the unfiltered,
        untempered logits at the sampled token.

    The kernel flags NaN logits and rows without a finite logit itself; reading
    that flag back to raise ``ValueError`` is the call's one device sync.
    """
    params = _validate(logits, temperature, top_k, top_p, min_p, seed, step, scan_logits=False)
    check_triton_device("logits", logits)
    check_last_dim_contiguous("logits", logits)
    batch, vocab = logits.shape
    rows, block, cap, pivots, options = _launch_config(
        batch, vocab, logits.device, params.has_top_k or params.has_top_p)
    tokens = torch.empty(batch, dtype=torch.int64, device=logits.device)
    logprobs = torch.empty(batch if return_logprobs else 1, dtype=torch.float32,
                           device=logits.device)
    status = torch.empty(batch, dtype=torch.int32, device=logits.device)
    n_blocks = triton.cdiv(vocab, block)
    block_max = torch.empty(batch * n_blocks, dtype=torch.float32, device=logits.device)
    cand_key = torch.empty(batch * cap, dtype=torch.int32, device=logits.device)
    cand_idx = torch.empty(batch * cap, dtype=torch.int32, device=logits.device)
    _sampling_kernel[(triton.cdiv(batch, rows),)](
        logits, logits.stride(0), batch, vocab,
        params.temperature, params.top_k, params.top_p, params.min_p, params.seed, params.step,
        tokens, logprobs, status, block_max, n_blocks, cand_key, cand_idx,
        HAS_TOP_K=params.has_top_k, HAS_TOP_P=params.has_top_p, HAS_MIN_P=params.has_min_p,
        SEED_PER_ROW=params.seed_per_row, WANT_LOGPROBS=return_logprobs,
        ROWS=rows, BLOCK=block, PIVOTS=pivots, CAP=cap, MAX_PASSES=_MAX_PASSES, **options,
    )
    bad = status.nonzero()
    if bad.numel():
        row = int(bad[0, 0])
        if int(status[row]) == 1:
            raise ValueError(f"logits must not contain NaN (row {row})")
        raise ValueError(f"logits must have a finite value in every row (row {row})")
    return (tokens, logprobs) if return_logprobs else tokens
