"""Unit behaviour of the KV-cache block manager.

Behaviour tests run on the C++ manager and on its pure-Python twin (the
benchmark baseline), which must agree; binding-specific tests (zero-copy views,
exception classes, numpy inputs) run on the C++ one only.
"""

import gc

import numpy as np
import pytest
from llm_engine._C import BlockManager, OutOfBlocksError, UnknownSequenceError

from llm_engine.bench.py_block_manager import PyBlockManager

BS = 4


@pytest.fixture(params=[BlockManager, PyBlockManager], ids=["cpp", "py"])
def make(request):
    return request.param


def compute(bm, seq_id, start=None):
    """Run a step that computes every not-yet-computed position [start, n)."""
    n = bm.num_tokens(seq_id)
    return bm.prepare_step([seq_id], [0 if start is None else start], [n])


@pytest.mark.parametrize("num_blocks, block_size", [(0, 4), (-1, 4), (4, 0), (4, -2)])
def test_constructor_rejects_non_positive_sizes(make, num_blocks, block_size):
    with pytest.raises(ValueError):
        make(num_blocks, block_size)


def test_allocate_reserves_ceil_blocks_in_order(make):
    bm = make(8, BS)
    assert bm.allocate(1, list(range(9))) == 0
    assert list(bm.block_table(1)) == [0, 1, 2]
    assert bm.num_tokens(1) == 9
    assert bm.num_free_blocks == 5
    assert bm.usage == pytest.approx(3 / 8)
    assert [bm.ref_count(b) for b in range(4)] == [1, 1, 1, 0]


def test_slot_is_block_times_block_size_plus_offset(make):
    bm = make(8, BS)
    bm.allocate(1, [5, 6])
    bm.allocate(2, [7])
    slots, tables, lens = bm.prepare_step([1, 2], [0, 0], [2, 1])
    assert list(slots) == [0, 1, 4]
    assert bm.append_token(1, 8) == 2
    assert bm.append_token(2, 9) == 5


def test_append_takes_a_new_block_when_last_is_full(make):
    bm = make(8, BS)
    bm.allocate(1, [1, 2, 3, 4])
    assert bm.num_free_blocks == 7
    assert bm.can_append(1)
    slot = bm.append_token(1, 5)
    assert list(bm.block_table(1)) == [0, 1]
    assert slot == 1 * BS
    assert bm.num_free_blocks == 6


def test_prefix_hit_only_after_the_block_is_computed(make):
    bm = make(16, BS)
    prompt = list(range(10))
    bm.allocate(1, prompt)
    assert bm.num_cached_tokens(prompt) == 0  # allocated, K/V not computed yet
    compute(bm, 1)
    assert bm.allocate(2, prompt) == 8
    assert list(bm.block_table(2))[:2] == list(bm.block_table(1))[:2]
    assert bm.ref_count(int(bm.block_table(1)[0])) == 2
    assert bm.block_table(2)[2] != bm.block_table(1)[2]


def test_prefix_hit_leaves_at_least_one_token_to_compute(make):
    bm = make(16, BS)
    prompt = list(range(2 * BS))
    bm.allocate(1, prompt)
    compute(bm, 1)
    assert bm.allocate(2, prompt) == BS
    assert bm.allocate(3, prompt[:BS]) == 0


def test_prefix_hit_is_chained_over_the_parent_block(make):
    bm = make(16, BS)
    bm.allocate(1, [1, 1, 1, 1, 2, 2, 2, 2, 0])
    compute(bm, 1)
    # Same second block after a different first block: no hit at all.
    assert bm.allocate(2, [9, 9, 9, 9, 2, 2, 2, 2, 0]) == 0
    # Same first block, different second block: one block.
    assert bm.allocate(3, [1, 1, 1, 1, 2, 2, 2, 3, 0]) == BS


def test_append_registers_the_block_it_fills_once_computed(make):
    bm = make(16, BS)
    bm.allocate(1, [1, 2, 3])
    compute(bm, 1)
    bm.append_token(1, 4)
    bm.append_token(1, 5)
    assert bm.num_cached_tokens([1, 2, 3, 4, 5]) == 0
    bm.prepare_step([1], [3], [5])
    assert bm.num_cached_tokens([1, 2, 3, 4, 5]) == BS


def test_freed_cached_blocks_stay_evictable_and_are_revived_by_a_hit(make):
    bm = make(8, BS)
    prompt = list(range(9))
    bm.allocate(1, prompt)
    compute(bm, 1)
    first_two = list(bm.block_table(1))[:2]
    bm.free(1)
    assert bm.num_free_blocks == 8
    assert bm.num_evictable_blocks == 2  # the two full blocks; the partial one is plain free
    assert bm.allocate(2, prompt) == 8
    assert list(bm.block_table(2))[:2] == first_two
    assert bm.num_evictable_blocks == 0
    assert [bm.ref_count(b) for b in first_two] == [1, 1]


def test_eviction_takes_the_least_recently_used_cached_block(make):
    bm = make(4, BS)
    a = [1] * BS + [0]
    b = [2] * BS + [0]
    bm.allocate(1, a)
    compute(bm, 1)
    bm.allocate(2, b)
    compute(bm, 2)
    bm.free(1)  # A's block becomes evictable first
    bm.free(2)
    assert bm.num_evictable_blocks == 2
    bm.allocate(3, a)  # touches A: B's block is now least recently used
    bm.free(3)
    bm.allocate(4, [7] * (3 * BS))  # 3 blocks: 2 plain free blocks + evict one cached block
    assert bm.num_cached_tokens(a) == BS
    assert bm.num_cached_tokens(b) == 0


def test_fork_shares_blocks_and_copies_on_write_the_partial_last_block(make):
    bm = make(8, BS)
    bm.allocate(1, [1, 2, 3, 4, 5, 6])
    compute(bm, 1)
    bm.fork(1, 2)
    assert list(bm.block_table(2)) == [0, 1]
    assert [bm.ref_count(0), bm.ref_count(1)] == [2, 2]
    slot = bm.append_token(2, 7)
    assert list(bm.block_table(2)) == [0, 2]
    assert slot == 2 * BS + 2
    assert bm.take_pending_copies() == [(1, 2)]
    assert bm.take_pending_copies() == []
    # The parent is now the only holder of block 1 and appends in place.
    assert bm.ref_count(1) == 1
    assert bm.append_token(1, 8) == 1 * BS + 2
    assert bm.take_pending_copies() == []
    assert list(bm.token_ids(2)) == [1, 2, 3, 4, 5, 6, 7]


def test_fork_with_full_last_block_needs_no_copy(make):
    bm = make(8, BS)
    bm.allocate(1, [1, 2, 3, 4])
    bm.fork(1, 2)
    assert bm.append_token(2, 5) == 1 * BS
    assert bm.take_pending_copies() == []
    assert bm.ref_count(0) == 2


def test_free_prefix_blocks_marks_them_released_and_keeps_logical_indexing(make):
    bm = make(8, BS)
    bm.allocate(1, list(range(3 * BS + 1)))
    compute(bm, 1)
    assert bm.free_prefix_blocks(1, 2) == 2
    assert list(bm.block_table(1)) == [-1, -1, 2, 3]
    assert bm.num_released_blocks(1) == 2 and bm.num_free_blocks == 6
    assert bm.free_prefix_blocks(1, 1) == 0  # already released: no change
    assert bm.free_prefix_blocks(1, 3) == 1
    assert list(bm.block_table(1)) == [-1, -1, -1, 3]
    # The next token still lands in logical block 3 (block id 3).
    assert bm.append_token(1, 5) == 3 * BS + 1
    assert list(bm.token_ids(1))[:3] == [0, 1, 2]
    slots, tables, lens = bm.prepare_step([1], [3 * BS + 1], [3 * BS + 2], 6)
    assert slots.tolist() == [3 * BS + 1]
    assert tables.tolist() == [[-1, -1, -1, 3, -1, -1]] and lens.tolist() == [3 * BS + 2]
    bm.free(1)
    assert bm.num_free_blocks == 8 and all(bm.ref_count(b) == 0 for b in range(8))


@pytest.mark.parametrize("n", [-1, 3, 10])
def test_free_prefix_blocks_rejects_counts_outside_the_full_blocks(make, n):
    bm = make(8, BS)
    bm.allocate(1, list(range(2 * BS + 1)))  # 2 full blocks, the third takes the next token
    with pytest.raises(ValueError, match="num_blocks"):
        bm.free_prefix_blocks(1, n)
    assert bm.num_free_blocks == 5 and bm.num_released_blocks(1) == 0
    with pytest.raises(KeyError):
        bm.free_prefix_blocks(9, 0)


def test_prepare_step_rejects_positions_in_released_blocks(make):
    bm = make(8, BS)
    bm.allocate(1, list(range(3 * BS)))
    bm.free_prefix_blocks(1, 1)
    with pytest.raises(ValueError, match="released"):
        bm.prepare_step([1], [BS - 1], [3 * BS])
    bm.prepare_step([1], [BS], [3 * BS])  # the positions after them are fine


def test_free_prefix_blocks_of_a_fork_only_drops_its_references(make):
    bm = make(8, BS)
    bm.allocate(1, list(range(2 * BS + 2)))
    compute(bm, 1)
    bm.fork(1, 2)
    assert bm.free_prefix_blocks(1, 2) == 2
    assert [bm.ref_count(b) for b in (0, 1)] == [1, 1]  # the child still holds them
    assert list(bm.block_table(2)) == [0, 1, 2] and bm.num_free_blocks == 5
    bm.fork(1, 3)  # a fork of a sequence with released blocks shares only the held ones
    assert list(bm.block_table(3)) == [-1, -1, 2] and bm.num_released_blocks(3) == 2
    assert bm.ref_count(2) == 3
    bm.free_prefix_blocks(2, 2)
    assert bm.num_free_blocks == 7
    for seq in (1, 2, 3):
        bm.free(seq)
    assert bm.num_free_blocks == 8


def test_released_cached_blocks_stay_in_the_prefix_cache(make):
    bm = make(8, BS)
    prompt = list(range(2 * BS + 1))
    bm.allocate(1, prompt)
    compute(bm, 1)
    head = list(bm.block_table(1))[:2]
    bm.free_prefix_blocks(1, 2)
    assert bm.num_evictable_blocks == 2  # registered: cached, no owner, evictable
    assert bm.allocate(2, prompt) == 2 * BS  # a new request still hits them
    assert list(bm.block_table(2))[:2] == head
    assert bm.num_evictable_blocks == 0


def test_released_blocks_are_reused_and_never_served_as_a_stale_prefix(make):
    bm = make(4, BS, enable_prefix_caching=False)
    bm.allocate(1, list(range(2 * BS + 1)))
    compute(bm, 1)
    bm.free_prefix_blocks(1, 2)
    bm.allocate(2, [9] * (2 * BS))  # takes the two released blocks back
    assert sorted(bm.block_table(2).tolist()) == [0, 1]
    assert bm.num_free_blocks == 1


def test_allocate_out_of_blocks_raises_and_changes_nothing(make):
    bm = make(2, BS)
    bm.allocate(1, [1])
    assert not bm.can_allocate(2 * BS)
    assert not bm.can_allocate_tokens(list(range(2 * BS)))
    with pytest.raises(RuntimeError, match="free blocks"):
        bm.allocate(2, list(range(2 * BS)))
    assert 2 not in bm
    assert bm.num_free_blocks == 1
    assert bm.allocate(2, list(range(BS))) == 0


def test_can_allocate_tokens_counts_prefix_hits(make):
    bm = make(3, BS)
    prompt = list(range(2 * BS + 1))
    bm.allocate(1, prompt)
    compute(bm, 1)
    bm.fork(1, 2)
    bm.free(1)
    assert bm.num_free_blocks == 0
    assert not bm.can_allocate(len(prompt))
    assert not bm.can_allocate_tokens(prompt)  # 2 cached blocks, still needs one fresh block
    bm.free(2)
    assert bm.can_allocate_tokens(prompt)


def test_append_without_a_free_block_raises_and_changes_nothing(make):
    bm = make(1, BS)
    bm.allocate(1, [1, 2, 3, 4])
    assert not bm.can_append(1)
    with pytest.raises(RuntimeError, match="free block"):
        bm.append_token(1, 5)
    assert bm.num_tokens(1) == 4
    with pytest.raises(RuntimeError):
        bm.append_tokens([1], [5])
    assert bm.num_tokens(1) == 4


def test_append_tokens_is_all_or_nothing(make):
    bm = make(3, BS)
    bm.allocate(1, [1, 2, 3, 4])
    bm.allocate(2, [1, 2, 3, 4])
    bm.allocate(3, [1])
    with pytest.raises(RuntimeError):
        bm.append_tokens([3, 1, 2], [9, 9, 9])  # 1 and 2 each need a block, none free
    assert [bm.num_tokens(s) for s in (1, 2, 3)] == [4, 4, 1]
    with pytest.raises(ValueError):
        bm.append_tokens([3, 3], [9, 9])
    with pytest.raises(KeyError):
        bm.append_tokens([3, 42], [9, 9])
    assert bm.num_tokens(3) == 1
    assert list(bm.append_tokens([3], [9])) == [2 * BS + 1]


def test_num_blocks_to_append_counts_full_and_shared_last_blocks(make):
    bm = make(8, BS)
    bm.allocate(1, [1, 2, 3, 4])  # full: needs a block
    bm.allocate(2, [1, 2])  # room left: none
    bm.fork(2, 3)  # 2 and 3 share a partial block: each needs a copy
    assert bm.num_blocks_to_append([1, 2]) == 2
    assert bm.num_blocks_to_append([1, 2, 3]) == 3
    bm.append_tokens([2], [5])  # 2 copies away; 3 now holds its block alone
    assert bm.num_blocks_to_append([1, 2, 3]) == 1
    with pytest.raises(ValueError):
        bm.num_blocks_to_append([1, 1])
    with pytest.raises(KeyError):
        bm.num_blocks_to_append([9])


def test_unknown_ids_and_double_free_raise_key_error(make):
    bm = make(4, BS)
    bm.allocate(1, [1])
    for call in (lambda: bm.free(7), lambda: bm.append_token(7, 1), lambda: bm.block_table(7),
                 lambda: bm.num_tokens(7), lambda: bm.fork(7, 8), lambda: bm.can_append(7),
                 lambda: bm.prepare_step([7], [0], [1])):
        with pytest.raises(KeyError):
            call()
    bm.free(1)
    with pytest.raises(KeyError):
        bm.free(1)
    assert bm.num_free_blocks == 4


def test_existing_ids_raise_value_error(make):
    bm = make(4, BS)
    bm.allocate(1, [1])
    bm.allocate(2, [1])
    with pytest.raises(ValueError):
        bm.allocate(1, [2])
    with pytest.raises(ValueError):
        bm.fork(1, 2)
    with pytest.raises(ValueError):
        bm.fork(1, 1)
    assert bm.ref_count(0) == 1


def test_bad_tokens_raise_value_error(make):
    bm = make(4, BS)
    with pytest.raises(ValueError):
        bm.allocate(1, [])
    with pytest.raises(ValueError):
        bm.allocate(1, [3, -1])
    bm.allocate(1, [3])
    with pytest.raises(ValueError):
        bm.append_token(1, -5)
    with pytest.raises(ValueError):
        bm.can_allocate(0)
    assert bm.num_tokens(1) == 1


def test_prepare_step_mixes_prefill_chunks_and_decode_tokens(make):
    bm = make(16, BS)
    bm.allocate(1, list(range(10)))
    bm.allocate(2, [1, 2, 3])
    compute(bm, 2)
    bm.append_token(2, 4)
    bm.append_token(2, 5)
    slots, tables, lens = bm.prepare_step([1, 2], [4, 4], [7, 5])  # chunk [4, 7), one decode
    t1, t2 = list(bm.block_table(1)), list(bm.block_table(2))
    assert slots.dtype == np.int64 and tables.dtype == np.int32 and lens.dtype == np.int32
    assert list(slots) == [t1[1] * BS + 0, t1[1] * BS + 1, t1[1] * BS + 2, t2[1] * BS + 0]
    assert tables.shape == (2, 2)
    assert tables.tolist() == [t1[:2], t2[:2]]
    assert list(lens) == [7, 5]
    _, wide, _ = bm.prepare_step([2], [4], [5], max_blocks=6)
    assert wide.tolist() == [t2[:2] + [-1] * 4]


def test_prepare_step_pads_short_tables_with_minus_one(make):
    bm = make(16, BS)
    bm.allocate(1, list(range(9)))
    bm.allocate(2, [1])
    _, tables, _ = bm.prepare_step([1, 2], [0, 0], [9, 1])
    assert tables.tolist() == [list(bm.block_table(1)), [int(bm.block_table(2)[0]), -1, -1]]


@pytest.mark.parametrize("starts, ends", [([0], [11]), ([-1], [2]), ([3], [2])])
def test_prepare_step_rejects_positions_outside_the_sequence(make, starts, ends):
    bm = make(16, BS)
    bm.allocate(1, list(range(10)))
    with pytest.raises(ValueError):
        bm.prepare_step([1], starts, ends)


def test_prepare_step_on_an_empty_batch_returns_empty_arrays(make):
    bm = make(4, BS)
    slots, tables, lens = bm.prepare_step([], [], [])
    assert slots.shape == (0,) and tables.shape == (0, 0) and lens.shape == (0,)


def test_prepare_step_rejects_duplicates_and_narrow_tables(make):
    bm = make(16, BS)
    bm.allocate(1, list(range(10)))
    with pytest.raises(ValueError):
        bm.prepare_step([1, 1], [0, 0], [1, 1])
    with pytest.raises(ValueError):
        bm.prepare_step([1], [0], [10], max_blocks=2)
    with pytest.raises(ValueError):
        bm.prepare_step([1], [0, 1], [10])


def test_counters_count_prompt_tokens(make):
    bm = make(16, BS)
    prompt = list(range(9))
    bm.allocate(1, prompt)
    compute(bm, 1)
    bm.allocate(2, prompt)
    assert bm.prefix_queries == 18
    assert bm.prefix_hits == 8


def test_disabled_prefix_caching_never_hits(make):
    bm = make(8, BS, False)
    prompt = list(range(9))
    bm.allocate(1, prompt)
    compute(bm, 1)
    bm.free(1)
    assert bm.num_evictable_blocks == 0
    assert bm.allocate(2, prompt) == 0
    assert bm.prefix_queries == 0


def test_ref_count_rejects_out_of_range_block(make):
    bm = make(4, BS)
    with pytest.raises(IndexError):
        bm.ref_count(4)
    with pytest.raises(IndexError):
        bm.ref_count(-1)


def test_cpp_and_python_managers_agree_on_a_mixed_workload():
    managers = [BlockManager(24, BS), PyBlockManager(24, BS)]
    system = [3] * 9
    outputs: list[list] = [[], []]
    for out, bm in zip(outputs, managers, strict=True):
        for seq in range(12):
            r = np.random.default_rng(seq)
            prompt = system + r.integers(0, 4, size=int(r.integers(1, 6))).tolist()
            if not bm.can_allocate_tokens(prompt):
                bm.free(min(s for s in range(seq) if s in bm))
            out.append(bm.allocate(seq, prompt))
            out.append(bm.prepare_step([seq], [out[-1]], [len(prompt)])[0].tolist())
            if seq % 3 == 2:
                bm.fork(seq, 100 + seq)
                out.append(bm.append_token(100 + seq, 1))
                out.append(bm.take_pending_copies())
                bm.free(100 + seq)
            out.append(bm.block_table(seq).tolist())
        out.append((bm.num_free_blocks, bm.num_evictable_blocks, bm.prefix_hits))
    assert outputs[0] == outputs[1]


# ---- C++ binding specifics ---------------------------------------------------------------


def test_block_table_is_a_read_only_view_of_the_manager_buffer():
    bm = BlockManager(8, BS)
    bm.allocate(1, list(range(9)))
    a, b = bm.block_table(1), bm.block_table(1)
    assert a.dtype == np.int32
    assert np.shares_memory(a, b)
    assert not a.flags.writeable
    with pytest.raises(ValueError):
        a[0] = 3


def test_block_table_view_follows_in_place_changes():
    bm = BlockManager(8, BS)
    bm.allocate(1, [1, 2, 3, 4, 5])
    bm.fork(1, 2)
    table = bm.block_table(2)
    bm.append_token(2, 6)  # copy-on-write replaces the last block in place
    assert table.tolist() == bm.block_table(2).tolist() == [0, 2]


def test_views_stay_valid_memory_after_growth_free_and_manager_deletion():
    bm = BlockManager(64, 1)
    bm.allocate(1, [1, 2, 3])
    table, tokens = bm.block_table(1), bm.token_ids(1)
    for t in range(40):  # grows the buffers past their capacity: moved, not freed under the view
        bm.append_token(1, t)
    assert table.tolist() == [0, 1, 2]
    assert bm.block_table(1).tolist() == list(range(43))
    grown = bm.block_table(1)
    bm.free(1)
    del bm
    gc.collect()
    assert tokens.tolist() == [1, 2, 3]
    assert grown.tolist() == list(range(43))


def test_exceptions_have_specific_types():
    bm = BlockManager(1, BS)
    assert issubclass(UnknownSequenceError, KeyError)
    assert issubclass(OutOfBlocksError, RuntimeError)
    with pytest.raises(UnknownSequenceError):
        bm.free(3)
    with pytest.raises(OutOfBlocksError):
        bm.allocate(1, list(range(BS + 1)))


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.uint8, np.int16, ">i4", ">i8"])
def test_token_ids_accept_integer_arrays(dtype):
    bm = BlockManager(8, BS)
    prompt = np.arange(9, dtype=dtype)
    bm.allocate(1, prompt)
    bm.prepare_step(np.array([1]), np.array([0]), np.array([9]))
    assert bm.allocate(2, prompt) == 8
    assert bm.token_ids(2).tolist() == list(range(9))
    assert bm.allocate(3, prompt[::2]) == 0  # non-contiguous view is converted


def test_token_ids_reject_floats_and_out_of_range_values():
    bm = BlockManager(8, BS)
    with pytest.raises(TypeError):
        bm.allocate(1, np.arange(4, dtype=np.float32))
    with pytest.raises(TypeError):
        bm.allocate(1, [1, 2.5])
    with pytest.raises(ValueError):
        bm.allocate(1, [2**31])
    with pytest.raises(ValueError):
        bm.allocate(1, np.array([2**40], dtype=np.int64))
    with pytest.raises(ValueError):
        bm.allocate(1, np.zeros((2, 2), dtype=np.int32))
    bm.allocate(1, [1])
    with pytest.raises(ValueError):
        bm.append_token(1, 2**31)
    assert bm.num_tokens(1) == 1


def test_cpp_and_python_managers_agree_under_cache_churn():
    """Many registrations and evictions (block_size 1, a small vocabulary): the prefix
    cache's table fills, evicts and refills while both managers stay identical."""
    rng = np.random.default_rng(1)
    managers = [BlockManager(200, 1), PyBlockManager(200, 1)]
    outputs: list[list] = [[], []]
    workload = []
    for _ in range(300):
        workload.append(rng.integers(0, 3, size=int(rng.integers(2, 40))).tolist())
    for out, bm in zip(outputs, managers, strict=True):
        live: list[int] = []
        for seq, prompt in enumerate(workload):
            while not bm.can_allocate_tokens(prompt):
                bm.free(live.pop(0))
            cached = bm.allocate(seq, prompt)
            out.append(cached)
            out.append(bm.prepare_step([seq], [cached], [len(prompt)])[0].tolist())
            live.append(seq)
            if seq % 4 == 0:
                bm.free(live.pop(0))
        out.append((bm.num_free_blocks, bm.num_evictable_blocks, bm.prefix_hits))
    assert outputs[0] == outputs[1]
    assert managers[0].prefix_hits > 0
