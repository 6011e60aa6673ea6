"""Paged KV cache kernels against their references and against dense attention.

The dense check gathers each sequence's K/V into a contiguous tensor and runs
plain softmax attention in fp64, so it also pins the references themselves.
"""

from __future__ import annotations

import math

import pytest
import torch
from llm_engine.kernels.paged_attention import (
    _choose_partition,
    paged_attention,
    paged_attention_reference,
    paged_prefill_attention,
    paged_prefill_attention_reference,
    store_kv_cache,
    store_kv_cache_reference,
)
from testing_utils import assert_close, interpreter_or_cuda

DEVICE = interpreter_or_cuda()
INTERP_DTYPES = [torch.float32, torch.float16]


def make_cache(num_blocks, block_size, kv_heads, head_dim, dtype, device=DEVICE):
    """K and V caches as the engine holds them: views into one (layers, 2, ...) tensor."""
    full = torch.randn(2, 2, num_blocks, block_size, kv_heads, head_dim, device=device)
    full = full.to(dtype)
    return full[1, 0], full[1, 1]


def make_block_tables(context_lens, block_size, num_blocks, pad_value=-1, device=DEVICE):
    """Shuffled, non-contiguous block ids for each sequence; padding past the context."""
    needed = [math.ceil(n / block_size) for n in context_lens]
    max_blocks = max(needed) + 1
    assert sum(needed) <= num_blocks
    perm = torch.randperm(num_blocks).tolist()
    table = torch.full((len(context_lens), max_blocks), pad_value, dtype=torch.int32)
    used = 0
    for s, n in enumerate(needed):
        table[s, :n] = torch.tensor(perm[used:used + n], dtype=torch.int32)
        used += n
    return table.to(device)


def dense_context(cache, table_row, length):
    block_size = cache.shape[1]
    pos = torch.arange(length, device=cache.device)
    blocks = table_row.long()[pos // block_size]
    return cache[blocks, pos % block_size]  # (length, kv_heads, head_dim)


def dense_attention(q, k, v, q_positions, scale):
    """q: (n_q, heads, d), k/v: (n_k, kv_heads, d); query i sees keys <= q_positions[i]."""
    group = q.shape[1] // k.shape[1]
    k = k.double().repeat_interleave(group, dim=1)
    v = v.double().repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.double(), k) * scale
    keys = torch.arange(k.shape[0], device=q.device)
    scores = scores.masked_fill(keys[None, None, :] > q_positions[None, :, None], float("-inf"))
    return torch.einsum("hqk,khd->qhd", torch.softmax(scores, dim=-1), v)


def dense_decode(q, k_cache, v_cache, tables, lens, scale):
    outs = []
    for s, n in enumerate(lens.tolist()):
        k = dense_context(k_cache, tables[s], n)
        v = dense_context(v_cache, tables[s], n)
        outs.append(dense_attention(q[s:s + 1], k, v, torch.tensor([n - 1], device=q.device),
                                    scale))
    return torch.cat(outs)


def dense_prefill(q, k_cache, v_cache, tables, cu, lens, scale):
    outs = []
    cu = cu.tolist()
    for s, n in enumerate(lens.tolist()):
        n_q = cu[s + 1] - cu[s]
        k = dense_context(k_cache, tables[s], n)
        v = dense_context(v_cache, tables[s], n)
        pos = torch.arange(n - n_q, n, device=q.device)
        outs.append(dense_attention(q[cu[s]:cu[s + 1]], k, v, pos, scale))
    return torch.cat(outs)


# ---------------------------------------------------------------------------
# store_kv_cache
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", INTERP_DTYPES)
@pytest.mark.parametrize("slot_dtype", [torch.int32, torch.int64])
def test_store_kv_cache_writes_each_token_to_its_slot_and_skips_minus_one(dtype, slot_dtype):
    k_cache, v_cache = make_cache(6, 4, 3, 16, dtype)
    before_k, before_v = k_cache.clone(), v_cache.clone()
    k = torch.randn(5, 3, 16, device=DEVICE).to(dtype)
    v = torch.randn(5, 3, 16, device=DEVICE).to(dtype)
    slots = torch.tensor([9, -1, 0, 23, 4], dtype=slot_dtype, device=DEVICE)
    store_kv_cache(k, v, k_cache, v_cache, slots)

    expected_k, expected_v = before_k.clone(), before_v.clone()
    for i, slot in enumerate(slots.tolist()):
        if slot >= 0:
            expected_k[slot // 4, slot % 4] = k[i]
            expected_v[slot // 4, slot % 4] = v[i]
    assert torch.equal(k_cache, expected_k)
    assert torch.equal(v_cache, expected_v)

    ref_k, ref_v = before_k.clone(), before_v.clone()
    store_kv_cache_reference(k, v, ref_k, ref_v, slots)
    assert torch.equal(ref_k, expected_k)
    assert torch.equal(ref_v, expected_v)


def test_store_kv_cache_leaves_other_layers_untouched():
    full = torch.zeros(2, 2, 4, 4, 2, 16, device=DEVICE)
    k = torch.ones(3, 2, 16, device=DEVICE)
    store_kv_cache(k, 2 * k, full[1, 0], full[1, 1], torch.tensor([0, 5, 15], device=DEVICE))
    assert full[0].abs().sum() == 0
    assert full[1, 0].sum() == 3 * 2 * 16
    assert full[1, 1].sum() == 2 * 3 * 2 * 16


# ---------------------------------------------------------------------------
# paged_attention (decode)
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", INTERP_DTYPES)
@pytest.mark.parametrize("heads,kv_heads", [(9, 3), (2, 2)])
def test_paged_attention_matches_reference_and_dense(dtype, heads, kv_heads):
    block_size, head_dim = 4, 16
    lens_list = [1, block_size, block_size + 1, 2 * block_size + 3, 3]
    k_cache, v_cache = make_cache(16, block_size, kv_heads, head_dim, dtype)
    tables = make_block_tables(lens_list, block_size, 16)
    lens = torch.tensor(lens_list, dtype=torch.int32, device=DEVICE)
    q = torch.randn(len(lens_list), heads, head_dim, device=DEVICE).to(dtype)

    out = paged_attention(q, k_cache, v_cache, tables, lens)
    ref = paged_attention_reference(q, k_cache, v_cache, tables, lens)
    dense = dense_decode(q, k_cache, v_cache, tables, lens, head_dim**-0.5)
    assert out.dtype == dtype and ref.dtype == dtype
    assert_close(out, ref, dtype, what="kernel vs reference")
    assert_close(out, dense, dtype, what="kernel vs dense")
    assert_close(ref, dense, dtype, what="reference vs dense")


@pytest.mark.parametrize("dtype", INTERP_DTYPES)
def test_paged_attention_split_context_merges_partitions(dtype):
    block_size, heads, kv_heads, head_dim = 8, 4, 2, 16
    # 16-token partitions: 1, 1, 3 and 19 of them (more than one chunk of the merge);
    # 16 and 33 sit on partition edges.
    lens_list = [7, 16, 33, 300]
    k_cache, v_cache = make_cache(48, block_size, kv_heads, head_dim, dtype)
    tables = make_block_tables(lens_list, block_size, 48)
    lens = torch.tensor(lens_list, dtype=torch.int32, device=DEVICE)
    q = torch.randn(len(lens_list), heads, head_dim, device=DEVICE).to(dtype)

    split = paged_attention(q, k_cache, v_cache, tables, lens, partition_size=16)
    whole = paged_attention(q, k_cache, v_cache, tables, lens, partition_size=512)
    dense = dense_decode(q, k_cache, v_cache, tables, lens, head_dim**-0.5)
    assert_close(split, dense, dtype, what="split vs dense")
    assert_close(whole, dense, dtype, what="unsplit vs dense")


@pytest.mark.parametrize("max_context,base_programs,expected", [
    (32768, 8, 512),  # one sequence, 8 KV heads: 64 partitions fill 132 SMs x 4
    (32768, 128, 6592),  # 16 sequences: 5 partitions
    (32768, 1024, 32768),  # 128 sequences already fill the device: no split
    (300, 8, 320),  # no partition shorter than 256 tokens: no split
    (1 << 20, 1, 4096),  # at most 256 partitions
])
def test_partition_choice_splits_only_an_under_filled_grid(max_context, base_programs, expected):
    assert _choose_partition(max_context, base_programs, 64, 528) == expected


def test_paged_attention_never_reads_table_entries_past_the_context():
    block_size, head_dim = 4, 16
    lens_list = [3, 9]
    k_cache, v_cache = make_cache(8, block_size, 1, head_dim, torch.float32)
    tables = make_block_tables(lens_list, block_size, 8)
    lens = torch.tensor(lens_list, dtype=torch.int32, device=DEVICE)
    q = torch.randn(2, 3, head_dim, device=DEVICE)
    garbage = tables.clone()
    garbage[0, 1:] = 2**30
    garbage[1, 3:] = -7
    for kwargs in ({}, {"partition_size": 16}):
        clean = paged_attention(q, k_cache, v_cache, tables, lens, **kwargs)
        dirty = paged_attention(q, k_cache, v_cache, garbage, lens, **kwargs)
        assert torch.equal(clean, dirty)
    assert torch.equal(paged_attention_reference(q, k_cache, v_cache, garbage, lens),
                       paged_attention_reference(q, k_cache, v_cache, tables, lens))


def test_paged_attention_gives_zeros_for_empty_padding_sequences():
    k_cache, v_cache = make_cache(8, 4, 2, 16, torch.float32)
    tables = make_block_tables([21, 0, 5], 4, 8)  # 28 tokens wide: two 16-token partitions
    lens = torch.tensor([21, 0, 5], dtype=torch.int32, device=DEVICE)
    q = torch.randn(3, 4, 16, device=DEVICE)
    dense = dense_decode(q[[0, 2]], k_cache, v_cache, tables[[0, 2]], lens[[0, 2]], 0.25)
    outs = [paged_attention(q, k_cache, v_cache, tables, lens),
            paged_attention(q, k_cache, v_cache, tables, lens, partition_size=16),
            paged_attention_reference(q, k_cache, v_cache, tables, lens)]
    for out in outs:
        assert torch.equal(out[1], torch.zeros_like(out[1]))
        assert_close(out[[0, 2]], dense, torch.float32)


def test_paged_attention_applies_softmax_scale():
    k_cache, v_cache = make_cache(4, 4, 2, 16, torch.float32)
    tables = make_block_tables([5, 2], 4, 4)
    lens = torch.tensor([5, 2], dtype=torch.int32, device=DEVICE)
    q = torch.randn(2, 4, 16, device=DEVICE)
    out = paged_attention(q, k_cache, v_cache, tables, lens, softmax_scale=0.7)
    dense = dense_decode(q, k_cache, v_cache, tables, lens, 0.7)
    assert_close(out, dense, torch.float32)
    assert_close(paged_attention_reference(q, k_cache, v_cache, tables, lens, 0.7), dense,
                 torch.float32)


def test_paged_attention_pads_head_dim_to_a_power_of_two():
    k_cache, v_cache = make_cache(4, 4, 1, 24, torch.float32)
    tables = make_block_tables([6], 4, 4)
    lens = torch.tensor([6], dtype=torch.int32, device=DEVICE)
    q = torch.randn(1, 2, 24, device=DEVICE)
    out = paged_attention(q, k_cache, v_cache, tables, lens)
    assert_close(out, dense_decode(q, k_cache, v_cache, tables, lens, 24**-0.5), torch.float32)


# ---------------------------------------------------------------------------
# paged_prefill_attention
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", INTERP_DTYPES)
def test_prefill_over_cached_prefix_matches_reference_and_dense(dtype):
    block_size, heads, kv_heads, head_dim = 4, 9, 3, 16
    cached = [0, 3, block_size, 8, 0]
    new = [5, 1, block_size + 1, 18, 1]
    lens_list = [c + n for c, n in zip(cached, new, strict=True)]
    k_cache, v_cache = make_cache(24, block_size, kv_heads, head_dim, dtype)
    tables = make_block_tables(lens_list, block_size, 24)
    lens = torch.tensor(lens_list, dtype=torch.int32, device=DEVICE)
    cu = torch.tensor([0] + torch.tensor(new).cumsum(0).tolist(), dtype=torch.int32,
                      device=DEVICE)
    q = torch.randn(sum(new), heads, head_dim, device=DEVICE).to(dtype)

    out = paged_prefill_attention(q, k_cache, v_cache, tables, cu, lens, max(new))
    ref = paged_prefill_attention_reference(q, k_cache, v_cache, tables, cu, lens, max(new))
    dense = dense_prefill(q, k_cache, v_cache, tables, cu, lens, head_dim**-0.5)
    assert_close(out, ref, dtype, what="kernel vs reference")
    assert_close(out, dense, dtype, what="kernel vs dense")
    assert_close(ref, dense, dtype, what="reference vs dense")


def test_prefill_of_one_token_per_sequence_equals_decode():
    k_cache, v_cache = make_cache(8, 4, 2, 16, torch.float32)
    lens_list = [1, 4, 13]
    tables = make_block_tables(lens_list, 4, 8)
    lens = torch.tensor(lens_list, dtype=torch.int32, device=DEVICE)
    cu = torch.arange(4, dtype=torch.int32, device=DEVICE)
    q = torch.randn(3, 4, 16, device=DEVICE)
    prefill = paged_prefill_attention(q, k_cache, v_cache, tables, cu, lens, 1)
    decode = paged_attention(q, k_cache, v_cache, tables, lens)
    assert_close(prefill, decode, torch.float32)


@pytest.mark.parametrize("dtype", INTERP_DTYPES)
def test_chunked_prefill_through_the_cache_equals_one_causal_pass(dtype):
    """Store a prompt in two chunks and attend each chunk: the same as causal attention
    over the whole prompt at once."""
    block_size, heads, kv_heads, head_dim, n = 4, 4, 2, 16, 19
    k_cache, v_cache = make_cache(8, block_size, kv_heads, head_dim, dtype)
    tables = make_block_tables([n], block_size, 8)
    k = torch.randn(n, kv_heads, head_dim, device=DEVICE).to(dtype)
    v = torch.randn(n, kv_heads, head_dim, device=DEVICE).to(dtype)
    q = torch.randn(n, heads, head_dim, device=DEVICE).to(dtype)
    pos = torch.arange(n, device=DEVICE)
    slots = (tables[0].long()[pos // block_size] * block_size + pos % block_size)

    outs = []
    for lo, hi in ((0, 7), (7, n)):
        store_kv_cache(k[lo:hi], v[lo:hi], k_cache, v_cache, slots[lo:hi])
        cu = torch.tensor([0, hi - lo], dtype=torch.int32, device=DEVICE)
        lens = torch.tensor([hi], dtype=torch.int32, device=DEVICE)
        outs.append(paged_prefill_attention(q[lo:hi], k_cache, v_cache, tables, cu, lens,
                                            hi - lo))
    expected = dense_attention(q, k, v, pos, head_dim**-0.5)
    assert_close(torch.cat(outs), expected, dtype)


@pytest.mark.parametrize("dtype", INTERP_DTYPES)
def test_kernels_accept_strided_views_of_a_fused_qkv_projection(dtype):
    """q, k, v as the model makes them: views into one (tokens, heads + 2 kv_heads, d) tensor."""
    block_size, heads, kv_heads, head_dim, n = 4, 4, 2, 16, 6
    qkv = torch.randn(n, heads + 2 * kv_heads, head_dim, device=DEVICE).to(dtype)
    q, k, v = qkv.split([heads, kv_heads, kv_heads], dim=1)
    k_cache, v_cache = make_cache(4, block_size, kv_heads, head_dim, dtype)
    tables = make_block_tables([n], block_size, 4)
    pos = torch.arange(n, device=DEVICE)
    slots = tables[0].long()[pos // block_size] * block_size + pos % block_size
    store_kv_cache(k, v, k_cache, v_cache, slots)
    cu = torch.tensor([0, n], dtype=torch.int32, device=DEVICE)
    lens = torch.tensor([n], dtype=torch.int32, device=DEVICE)
    expected = dense_attention(q, k, v, pos, head_dim**-0.5)
    assert_close(paged_prefill_attention(q, k_cache, v_cache, tables, cu, lens, n), expected,
                 dtype)
    assert_close(paged_attention(q[-1:], k_cache, v_cache, tables, lens), expected[-1:], dtype)


# ---------------------------------------------------------------------------
# Input validation
# ---------------------------------------------------------------------------


def _decode_args():
    k_cache, v_cache = make_cache(4, 4, 2, 16, torch.float32)
    return {
        "q": torch.randn(2, 4, 16, device=DEVICE),
        "k_cache": k_cache,
        "v_cache": v_cache,
        "block_tables": torch.zeros(2, 3, dtype=torch.int32, device=DEVICE),
        "context_lens": torch.ones(2, dtype=torch.int32, device=DEVICE),
    }


@pytest.mark.parametrize("fn", [paged_attention, paged_attention_reference])
@pytest.mark.parametrize("name,bad", [
    ("q", lambda a: a["q"][:, :3]),  # 3 heads over 2 kv heads
    ("q", lambda a: a["q"][..., :8]),  # head_dim mismatch
    ("q", lambda a: a["q"].half()),
    ("v_cache", lambda a: a["v_cache"][:, :2]),  # block_size mismatch
    ("block_tables", lambda a: a["block_tables"].long()),
    ("block_tables", lambda a: a["block_tables"][:1]),
    ("context_lens", lambda a: a["context_lens"][:1]),
    ("context_lens", lambda a: a["context_lens"].float()),
    ("context_lens", lambda a: a["context_lens"].repeat(2)[::2]),  # strided
    ("block_tables", lambda a: a["block_tables"].t().contiguous().t()),  # column-major
])
def test_paged_attention_rejects_bad_inputs_naming_the_argument(fn, name, bad):
    args = _decode_args()
    args[name] = bad(args)
    with pytest.raises(ValueError, match=name):
        fn(**args)


def test_paged_attention_rejects_bad_partition_size():
    with pytest.raises(ValueError, match="partition_size"):
        paged_attention(**_decode_args(), partition_size=24)


@pytest.mark.parametrize("fn", [store_kv_cache, store_kv_cache_reference])
@pytest.mark.parametrize("name,bad", [
    ("k", lambda a: a["k"][:, :1]),
    ("v", lambda a: a["v"][:2]),
    ("slot_mapping", lambda a: a["slot_mapping"][:2]),
    ("slot_mapping", lambda a: a["slot_mapping"].float()),
    ("slot_mapping", lambda a: a["slot_mapping"].repeat(2)[::2]),
    ("k", lambda a: a["k"].half()),
])
def test_store_kv_cache_rejects_bad_inputs_naming_the_argument(fn, name, bad):
    k_cache, v_cache = make_cache(4, 4, 2, 16, torch.float32)
    args = {
        "k": torch.randn(3, 2, 16, device=DEVICE),
        "v": torch.randn(3, 2, 16, device=DEVICE),
        "k_cache": k_cache,
        "v_cache": v_cache,
        "slot_mapping": torch.arange(3, device=DEVICE),
    }
    args[name] = bad(args)
    with pytest.raises(ValueError, match=name):
        fn(**args)


@pytest.mark.parametrize("fn", [paged_prefill_attention, paged_prefill_attention_reference])
def test_prefill_rejects_bad_cu_seqlens_and_max_seqlen(fn):
    args = _decode_args()
    args["q"] = torch.randn(5, 4, 16, device=DEVICE)
    with pytest.raises(ValueError, match="cu_seqlens_q"):
        fn(**args, cu_seqlens_q=torch.tensor([0, 2, 5], device=DEVICE), max_seqlen_q=3)
    with pytest.raises(ValueError, match="cu_seqlens_q"):
        fn(**args, cu_seqlens_q=torch.tensor([[0, 2, 5]], dtype=torch.int32, device=DEVICE),
           max_seqlen_q=3)
    with pytest.raises(ValueError, match="max_seqlen_q"):
        fn(**args, cu_seqlens_q=torch.tensor([0, 2, 5], dtype=torch.int32, device=DEVICE),
           max_seqlen_q=0)


# ---------------------------------------------------------------------------
# GPU: bf16 and long contexts
# ---------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("num_seqs,max_len", [(1, 32768), (16, 4096), (64, 1024)])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_paged_attention_bf16_long_contexts(num_seqs, max_len, head_dim):
    block_size, heads, kv_heads = 16, 32, 8
    lens_list = [max_len] + torch.randint(1, max_len + 1, (num_seqs - 1,)).tolist()
    num_blocks = sum(math.ceil(n / block_size) for n in lens_list) + 4
    k_cache, v_cache = make_cache(num_blocks, block_size, kv_heads, head_dim, torch.bfloat16,
                                  "cuda")
    tables = make_block_tables(lens_list, block_size, num_blocks, device="cuda")
    lens = torch.tensor(lens_list, dtype=torch.int32, device="cuda")
    q = torch.randn(num_seqs, heads, head_dim, device="cuda", dtype=torch.bfloat16)
    out = paged_attention(q, k_cache, v_cache, tables, lens)
    ref = paged_attention_reference(q, k_cache, v_cache, tables, lens)
    assert_close(out, ref, torch.bfloat16)
    assert_close(out, dense_decode(q, k_cache, v_cache, tables, lens, head_dim**-0.5),
                 torch.bfloat16, what="kernel vs dense")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_prefill_gpu_long_prefix(dtype):
    block_size, heads, kv_heads, head_dim = 16, 12, 4, 128
    cached = [0, 1000, 4093, 16]
    new = [700, 300, 129, 1]
    lens_list = [c + n for c, n in zip(cached, new, strict=True)]
    num_blocks = sum(math.ceil(n / block_size) for n in lens_list) + 4
    k_cache, v_cache = make_cache(num_blocks, block_size, kv_heads, head_dim, dtype, "cuda")
    tables = make_block_tables(lens_list, block_size, num_blocks, device="cuda")
    lens = torch.tensor(lens_list, dtype=torch.int32, device="cuda")
    cu = torch.tensor([0] + torch.tensor(new).cumsum(0).tolist(), dtype=torch.int32,
                      device="cuda")
    q = torch.randn(sum(new), heads, head_dim, device="cuda", dtype=dtype)
    out = paged_prefill_attention(q, k_cache, v_cache, tables, cu, lens, max(new))
    ref = paged_prefill_attention_reference(q, k_cache, v_cache, tables, cu, lens, max(new))
    assert_close(out, ref, dtype)


@pytest.mark.gpu
def test_store_kv_cache_bf16_large_cache_offsets():
    k_cache, v_cache = make_cache(4096, 16, 8, 128, torch.bfloat16, "cuda")
    k = torch.randn(300, 8, 128, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(300, 8, 128, device="cuda", dtype=torch.bfloat16)
    slots = torch.randperm(4096 * 16, device="cuda")[:300]
    slots[::7] = -1
    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    store_kv_cache(k, v, k_cache, v_cache, slots)
    store_kv_cache_reference(k, v, ref_k, ref_v, slots)
    assert torch.equal(k_cache, ref_k) and torch.equal(v_cache, ref_v)


@pytest.mark.gpu
def test_paged_attention_can_be_captured_in_a_cuda_graph():
    k_cache, v_cache = make_cache(64, 16, 2, 64, torch.bfloat16, "cuda")
    lens_list = [700, 5, 33]
    tables = make_block_tables(lens_list, 16, 64, device="cuda")
    lens = torch.tensor(lens_list, dtype=torch.int32, device="cuda")
    q = torch.randn(3, 8, 64, device="cuda", dtype=torch.bfloat16)
    eager = paged_attention(q, k_cache, v_cache, tables, lens)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = paged_attention(q, k_cache, v_cache, tables, lens)
    lens.copy_(torch.tensor([600, 7, 40], dtype=torch.int32))
    graph.replay()
    assert_close(captured, paged_attention_reference(q, k_cache, v_cache, tables, lens),
                 torch.bfloat16)
    assert not torch.equal(captured, eager)
