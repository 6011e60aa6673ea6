"""KVCache: sizing from a budget, per-layer views, copy-on-write block copies."""

import numpy as np
import pytest
import torch

from llm_engine.kv_cache import KVCache

GEOM = dict(num_layers=3, kv_heads=2, head_dim=8, block_size=4)
BYTES_PER_BLOCK_FP16 = 3 * 2 * 4 * 2 * 8 * 2


def filled(cache: KVCache) -> KVCache:
    cache.cache.copy_(torch.randn(cache.cache.shape).to(cache.dtype))
    return cache


def test_explicit_num_blocks_sets_shape_and_bytes():
    kv = KVCache(**GEOM, num_blocks=5)
    assert kv.cache.shape == (3, 2, 5, 4, 2, 8)
    assert kv.cache.dtype == torch.float16
    assert kv.bytes_per_block == BYTES_PER_BLOCK_FP16
    assert kv.num_bytes == kv.cache.numel() * kv.cache.element_size()
    assert kv.manager.num_blocks == 5 and kv.manager.block_size == 4


def test_byte_budget_gives_whole_blocks():
    kv = KVCache(**GEOM, dtype=torch.float32, memory_bytes=10 * 2 * BYTES_PER_BLOCK_FP16 + 7)
    assert kv.bytes_per_block == 2 * BYTES_PER_BLOCK_FP16
    assert kv.num_blocks == 10


@pytest.mark.parametrize("kwargs", [
    dict(memory_bytes=BYTES_PER_BLOCK_FP16 - 1),
    dict(memory_bytes=0),
    dict(num_blocks=0),
    dict(),
    dict(num_blocks=2, memory_bytes=10 * BYTES_PER_BLOCK_FP16),
])
def test_bad_sizes_raise_value_error(kwargs):
    with pytest.raises(ValueError):
        KVCache(**GEOM, **kwargs)


@pytest.mark.parametrize("name", ["num_layers", "kv_heads", "head_dim", "block_size"])
def test_non_positive_geometry_raises_value_error(name):
    with pytest.raises(ValueError, match=name):
        KVCache(**{**GEOM, name: 0}, num_blocks=2)


def test_layer_views_share_storage_and_match_slots():
    kv = KVCache(**GEOM, num_blocks=4)
    k, v = kv.layer(1)
    assert k.shape == v.shape == (4, 4, 2, 8)
    slot = kv.manager.allocate(0, [1, 2, 3, 4, 5]) + 4  # position 4 -> slot of block 1, offset 0
    slots, _, _ = kv.manager.prepare_step([0], [0], [5])
    assert int(slots[4]) == slot
    k.view(-1, 2, 8)[slot] = 7.0
    assert (kv.cache[1, 0, slot // 4, slot % 4] == 7.0).all()
    assert kv.layer(-1)[1].data_ptr() == kv.cache[2, 1].data_ptr()
    with pytest.raises(IndexError):
        kv.layer(3)


def test_copy_blocks_copies_k_and_v_of_every_layer():
    kv = filled(KVCache(**GEOM, num_blocks=6, dtype=torch.float32))
    before = kv.cache.clone()
    kv.copy_blocks([(1, 4), (2, 5)])
    assert torch.equal(kv.cache[:, :, 4], before[:, :, 1])
    assert torch.equal(kv.cache[:, :, 5], before[:, :, 2])
    assert torch.equal(kv.cache[:, :, :4], before[:, :, :4])


def test_copy_blocks_equals_copying_pair_by_pair():
    kv = filled(KVCache(**GEOM, num_blocks=6, dtype=torch.float32))
    pairs = np.array([[0, 3], [3, 4], [1, 3], [4, 0]], dtype=np.int32)
    expected = kv.cache.clone()
    for src, dst in pairs.tolist():
        expected[:, :, dst] = expected[:, :, src]
    kv.copy_blocks(pairs)
    assert torch.equal(kv.cache, expected)


def test_copy_blocks_rejects_out_of_range_blocks():
    kv = KVCache(**GEOM, num_blocks=3)
    with pytest.raises(ValueError, match="out of range"):
        kv.copy_blocks([(0, 3)])


def test_apply_pending_copies_gives_forked_child_the_parents_kv():
    kv = filled(KVCache(**GEOM, num_blocks=6, dtype=torch.float32))
    bm = kv.manager
    bm.allocate(1, [1, 2, 3, 4, 5, 6])
    bm.prepare_step([1], [0], [6])
    bm.fork(1, 2)
    bm.append_token(2, 9)
    parent_last, child_last = int(bm.block_table(1)[1]), int(bm.block_table(2)[1])
    assert parent_last != child_last
    assert kv.apply_pending_copies() == 1
    assert torch.equal(kv.cache[:, :, child_last], kv.cache[:, :, parent_last])
    assert kv.apply_pending_copies() == 0


@pytest.mark.gpu
def test_cuda_budget_is_a_fraction_of_free_memory():
    free, _ = torch.cuda.mem_get_info()
    kv = KVCache(num_layers=2, kv_heads=2, head_dim=64, block_size=16, dtype=torch.bfloat16,
                 device="cuda", memory_fraction=0.05)
    assert kv.cache.is_cuda
    assert kv.num_blocks == int(free * 0.05) // kv.bytes_per_block
    kv.copy_blocks([(0, 1)])


def test_cpu_cache_is_zero_aligned_and_takes_memory_only_as_blocks_are_written():
    psutil = pytest.importorskip("psutil")
    process = psutil.Process()
    before = process.memory_info().rss
    kv = KVCache(num_layers=4, kv_heads=2, head_dim=64, block_size=16, dtype=torch.float32,
                 memory_bytes=1 << 30)
    assert kv.cache.data_ptr() % 64 == 0 and kv.cache.is_contiguous()
    assert process.memory_info().rss - before < (1 << 30) // 4
    k, _ = kv.layer(3)
    assert torch.equal(k[-1], torch.zeros_like(k[-1]))
    k[:8].fill_(1.0)
    assert float(kv.layer(3)[0][:8].sum()) == 8 * 16 * 2 * 64
    # One block written in each layer's K and V commits about a page each, not a huge
    # page each (2 MiB: what numpy's and glibc's large allocations would ask for).
    before = process.memory_info().rss
    for i in range(4):
        for t in kv.layer(i):
            t[1000].fill_(2.0)
    assert process.memory_info().rss - before < 8 * (1 << 20) // 4
