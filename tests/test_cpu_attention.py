"""The C++ CPU decode attention (``_C.paged_decode_attention``) against the PyTorch
reference, and its input checks. ``ops.paged_attention`` picks it for fp32 on CPU."""

from __future__ import annotations

import pytest
import torch
from llm_engine.kernels.paged_attention import paged_attention_reference
from testing_utils import assert_close

from llm_engine import _C, ops


def _case(lens: list[int], heads: int, kv_heads: int, head_dim: int, block_size: int,
          seed: int = 0, spare_blocks: int = 3):
    """Caches whose used blocks are shuffled, and table columns past each context that
    hold garbage (out-of-range ids) the kernel must never read."""
    g = torch.Generator().manual_seed(seed)
    blocks_per_seq = [-(-n // block_size) for n in lens]
    num_blocks = sum(blocks_per_seq) + spare_blocks
    k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g)
    max_blocks = max(blocks_per_seq, default=0) + 2
    tables = torch.full((len(lens), max_blocks), 10**6, dtype=torch.int32)
    ids = torch.randperm(num_blocks, generator=g).int()
    used = 0
    for i, n in enumerate(blocks_per_seq):
        tables[i, :n] = ids[used:used + n]
        used += n
    q = torch.randn(len(lens), heads, head_dim, generator=g)
    return q, k_cache, v_cache, tables, torch.tensor(lens, dtype=torch.int32)


def _native(q, k_cache, v_cache, tables, lens, scale, threads=2):
    out = torch.empty_like(q)
    _C.paged_decode_attention(out.numpy(), q.numpy(), k_cache.numpy(), v_cache.numpy(),
                              tables.numpy(), lens.numpy(), scale, threads)
    return out


CASES = [  # lens, heads, kv_heads, head_dim, block_size
    ([1], 1, 1, 1, 1),
    ([7, 16, 33, 1], 4, 4, 8, 16),  # block boundaries
    ([5, 0, 12, 3], 6, 2, 24, 4),  # GQA, an empty context
    ([300, 17], 9, 3, 64, 16),  # SmolLM2's heads (compiled for head_dim 64)
    ([40, 3], 4, 2, 128, 16),  # compiled for head_dim 128
    ([9, 9, 9], 8, 1, 7, 3),  # odd head_dim, one kv head
    ([2048], 2, 1, 16, 32),  # long context: exp of very negative scores
    ([1100, 513, 512, 2], 4, 2, 16, 48),  # 512-position chunks that start inside a block
]


@pytest.mark.parametrize("lens, heads, kv_heads, head_dim, block_size", CASES)
def test_native_decode_matches_reference(lens, heads, kv_heads, head_dim, block_size) -> None:
    q, k_cache, v_cache, tables, ctx = _case(lens, heads, kv_heads, head_dim, block_size)
    scale = head_dim**-0.5 * 3  # sharper than usual: large score ranges
    ref = paged_attention_reference(q, k_cache, v_cache, tables.clamp(max=k_cache.shape[0] - 1),
                                    ctx, scale)
    out = _native(q, k_cache, v_cache, tables, ctx, scale)
    assert_close(out, ref, torch.float32)
    assert torch.equal(out[ctx == 0], torch.zeros_like(out[ctx == 0]))
    # Deterministic, whatever the thread count, and each sequence as it would be alone.
    assert torch.equal(out, _native(q, k_cache, v_cache, tables, ctx, scale, threads=1))
    for i in range(len(lens)):
        alone = _native(q[i:i + 1], k_cache, v_cache, tables[i:i + 1], ctx[i:i + 1], scale)
        assert torch.equal(alone[0], out[i])


def test_ops_dispatches_fp32_cpu_decode_to_native() -> None:
    q, k_cache, v_cache, tables, ctx = _case([5, 40, 1], 6, 2, 16, 8)
    tables = tables.clamp(max=k_cache.shape[0] - 1)
    assert ops.registry().choose("paged_attention", q, k_cache, v_cache, tables, ctx) == "cpp"
    strided_q = torch.cat((q, q), dim=-1)[..., :16]  # as q arrives: a view of the qkv output
    with torch.inference_mode():
        out = ops.paged_attention(strided_q, k_cache, v_cache, tables, ctx)
    assert torch.equal(out, _native(q, k_cache, v_cache, tables, ctx, 16**-0.5, threads=1))
    with pytest.raises(ValueError, match="softmax_scale"):  # checked as the reference does
        ops.paged_attention(q, k_cache, v_cache, tables, ctx, softmax_scale=-1.0)
    half = [t.half() for t in (q, k_cache, v_cache)]
    assert ops.registry().choose("paged_attention", *half, tables, ctx) == "reference"
    assert_close(ops.paged_attention(*half, tables, ctx),
                 paged_attention_reference(q, k_cache, v_cache, tables, ctx), torch.float16)


def test_native_decode_rejects_bad_input() -> None:
    q, k_cache, v_cache, tables, ctx = _case([5, 9], 4, 2, 8, 4)
    good = dict(out=torch.empty_like(q).numpy(), q=q.numpy(), k_cache=k_cache.numpy(),
                v_cache=v_cache.numpy(), block_tables=tables.numpy(), context_lens=ctx.numpy(),
                scale=0.3)

    def call(**changes):
        _C.paged_decode_attention(**{**good, **changes})

    call()
    bad_table = tables.clone()
    bad_table[1, 2] = k_cache.shape[0]
    with pytest.raises(ValueError, match=r"block_tables\[1, 2\]"):
        call(block_tables=bad_table.numpy())
    bad_table[1, 2] = -1
    with pytest.raises(ValueError, match=r"block_tables\[1, 2\]"):
        call(block_tables=bad_table.numpy())
    with pytest.raises(ValueError, match=r"context_lens\[0\]"):
        call(context_lens=torch.tensor([-1, 9], dtype=torch.int32).numpy())
    with pytest.raises(ValueError, match=r"context_lens\[1\]"):
        call(context_lens=torch.tensor([5, 10**6], dtype=torch.int32).numpy())
    with pytest.raises(TypeError, match="q must be a C-contiguous float32"):
        call(q=q.double().numpy())
    with pytest.raises(TypeError, match="k_cache must be a C-contiguous float32"):
        call(k_cache=k_cache.transpose(1, 2).numpy())
    with pytest.raises(TypeError, match="block_tables must be a C-contiguous int32"):
        call(block_tables=tables.long().numpy())
    with pytest.raises(TypeError, match="context_lens"):
        call(context_lens=[5, 9])
    with pytest.raises(ValueError, match="v_cache"):
        call(v_cache=v_cache[:-1].contiguous().numpy())
    with pytest.raises(ValueError, match="multiple of kv_heads"):
        call(k_cache=torch.zeros(*k_cache.shape[:2], 3, 8).numpy(),
             v_cache=torch.zeros(*k_cache.shape[:2], 3, 8).numpy())
    with pytest.raises(ValueError, match="one row per sequence"):
        call(context_lens=ctx[:1].contiguous().numpy())
    with pytest.raises(ValueError, match="out"):
        call(out=torch.empty(2, 4, 9).numpy())
    with pytest.raises(ValueError, match="num_threads"):
        call(num_threads=0)
