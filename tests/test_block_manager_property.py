"""Property-based test of the KV-cache block manager.

A hypothesis state machine drives random allocate / compute (prepare_step) /
append / fork / free / free_prefix_blocks (a sliding window moving past computed
blocks) sequences against the C++ manager and its pure-Python twin
(the model) and simulates the KV cache itself: every computed position writes,
into its slot, the token prefix that position's K/V depends on, and pending
copy-on-write copies are applied before each step. After every step it checks

- each block's reference count equals the number of block-table entries naming
  it (no block is owned by two sequences unless the count says so);
- free + used = total, and both managers agree on tables, counters and outputs;
- every computed position of every sequence outside its released blocks reads
  back its own prefix from the simulated cache, so a prefix hit (or a copy-on-write) only ever serves blocks
  whose token ids equal the query's;

and at teardown that freeing every sequence makes every block free again.
"""

import pytest

pytest.importorskip("hypothesis", reason="the property tests need the hypothesis package")

import hypothesis.strategies as st  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from llm_engine._C import BlockManager, OutOfBlocksError

from llm_engine.bench.py_block_manager import PyBlockManager

BS = 2
NUM_BLOCKS = 10
# A tiny vocabulary and shared system prompts make prefix hits common.
TOKENS = st.integers(0, 2)
SYSTEM_PROMPTS = [[], [0, 1, 2, 0], [1, 1, 1, 1, 2]]


class BlockManagerMachine(RuleBasedStateMachine):
    caching = True

    def __init__(self) -> None:
        super().__init__()
        self.bm = BlockManager(NUM_BLOCKS, BS, self.caching)
        self.model = PyBlockManager(NUM_BLOCKS, BS, self.caching)
        self.kv: list[tuple[int, ...] | None] = [None] * (NUM_BLOCKS * BS)
        self.tokens: dict[int, list[int]] = {}
        self.computed: dict[int, int] = {}
        self.next_id = 0

    # -- helpers ----------------------------------------------------------------
    def _slot(self, seq: int, pos: int) -> int:
        table = self.bm.block_table(seq)
        return int(table[pos // BS]) * BS + pos % BS

    def _new_id(self) -> int:
        self.next_id += 1
        return self.next_id

    def _apply_copies(self) -> None:
        """Perform the recorded copy-on-write copies, as the engine does before a forward.

        Done right after each append: no step writes the cache in between, so
        copying now or just before the next step reads the same source K/V.
        """
        copies = self.bm.take_pending_copies()
        assert copies == self.model.take_pending_copies()
        for src, dst in copies:
            self.kv[dst * BS:(dst + 1) * BS] = self.kv[src * BS:(src + 1) * BS]

    # -- rules ------------------------------------------------------------------
    @rule(system=st.sampled_from(SYSTEM_PROMPTS), suffix=st.lists(TOKENS, max_size=6))
    def allocate(self, system, suffix):
        prompt = system + suffix
        if not prompt:
            return
        fits = self.bm.can_allocate_tokens(prompt)
        assert fits == self.model.can_allocate_tokens(prompt)
        if self.bm.can_allocate(len(prompt)):
            assert fits
        seq = self._new_id()
        if not fits:
            with pytest.raises(OutOfBlocksError):
                self.bm.allocate(seq, prompt)
            with pytest.raises(RuntimeError):
                self.model.allocate(seq, prompt)
            return
        cached = self.bm.allocate(seq, prompt)
        assert cached == self.model.allocate(seq, prompt)
        assert cached % BS == 0 and 0 <= cached < len(prompt)
        if not self.caching:
            assert cached == 0
        self.tokens[seq] = list(prompt)
        self.computed[seq] = cached
        for pos in range(cached):  # the hit blocks hold exactly this prompt's prefix
            assert self.kv[self._slot(seq, pos)] == tuple(prompt[:pos + 1])

    @precondition(lambda self: any(self.computed[s] < len(self.tokens[s]) for s in self.tokens))
    @rule(data=st.data())
    def compute(self, data):
        pending = sorted(s for s in self.tokens if self.computed[s] < len(self.tokens[s]))
        seqs = data.draw(st.lists(st.sampled_from(pending), min_size=1, unique=True))
        starts = [self.computed[s] for s in seqs]
        ends = [data.draw(st.integers(self.computed[s] + 1, len(self.tokens[s]))) for s in seqs]
        slots, tables, lens = self.bm.prepare_step(seqs, starts, ends)
        ref_slots, ref_tables, ref_lens = self.model.prepare_step(seqs, starts, ends)
        assert slots.tolist() == ref_slots.tolist()
        assert tables.tolist() == ref_tables.tolist()
        assert lens.tolist() == ends == ref_lens.tolist()
        i = 0
        for row, (seq, start, end) in enumerate(zip(seqs, starts, ends, strict=True)):
            used = -(-end // BS)
            assert tables[row, :used].tolist() == self.bm.block_table(seq)[:used].tolist()
            assert (tables[row, used:] == -1).all()
            for pos in range(start, end):
                assert slots[i] == self._slot(seq, pos)
                self.kv[slots[i]] = tuple(self.tokens[seq][:pos + 1])
                i += 1
            self.computed[seq] = end
        assert i == len(slots)

    @precondition(lambda self: any(self.computed[s] == len(self.tokens[s]) for s in self.tokens))
    @rule(data=st.data(), token=TOKENS)
    def append(self, data, token):
        ready = sorted(s for s in self.tokens if self.computed[s] == len(self.tokens[s]))
        seq = data.draw(st.sampled_from(ready))
        can = self.bm.can_append(seq)
        assert can == self.model.can_append(seq)
        if not can:
            with pytest.raises(OutOfBlocksError):
                self.bm.append_token(seq, token)
            return
        slot = self.bm.append_token(seq, token)
        assert slot == self.model.append_token(seq, token)
        self._apply_copies()
        self.tokens[seq].append(token)
        assert slot == self._slot(seq, len(self.tokens[seq]) - 1)

    @precondition(lambda self: any(self.computed[s] == len(self.tokens[s]) for s in self.tokens))
    @rule(data=st.data())
    def append_batch(self, data):
        ready = sorted(s for s in self.tokens if self.computed[s] == len(self.tokens[s]))
        seqs = data.draw(st.lists(st.sampled_from(ready), min_size=1, unique=True))
        toks = data.draw(st.lists(TOKENS, min_size=len(seqs), max_size=len(seqs)))
        needed = self.bm.num_blocks_to_append(seqs)
        assert needed == self.model.num_blocks_to_append(seqs)
        if needed > self.bm.num_free_blocks:
            with pytest.raises(OutOfBlocksError):
                self.bm.append_tokens(seqs, toks)
            with pytest.raises(RuntimeError):
                self.model.append_tokens(seqs, toks)
            return
        slots = self.bm.append_tokens(seqs, toks)
        assert slots.tolist() == self.model.append_tokens(seqs, toks).tolist()
        self._apply_copies()
        for seq, tok, slot in zip(seqs, toks, slots, strict=True):
            self.tokens[seq].append(tok)
            assert slot == self._slot(seq, len(self.tokens[seq]) - 1)

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def fork(self, data):
        parent = data.draw(st.sampled_from(sorted(self.tokens)))
        child = self._new_id()
        self.bm.fork(parent, child)
        self.model.fork(parent, child)
        self.tokens[child] = list(self.tokens[parent])
        self.computed[child] = self.computed[parent]

    @precondition(lambda self: any(self.computed[s] >= BS for s in self.tokens))
    @rule(data=st.data())
    def free_prefix(self, data):
        """Release leading computed full blocks, as the engine does when they fall out of
        a sliding window; a count past the full blocks is a ValueError in both."""
        seq = data.draw(st.sampled_from(sorted(s for s in self.tokens if self.computed[s] >= BS)))
        n = data.draw(st.integers(0, self.computed[seq] // BS))
        before = self.bm.num_released_blocks(seq)
        released = self.bm.free_prefix_blocks(seq, n)
        assert released == self.model.free_prefix_blocks(seq, n) == max(0, n - before)
        assert self.bm.num_released_blocks(seq) == max(before, n)
        assert (self.bm.block_table(seq)[:n] == -1).all()
        full = len(self.tokens[seq]) // BS
        for bad in (-1, full + 1):
            with pytest.raises(ValueError, match="num_blocks"):
                self.bm.free_prefix_blocks(seq, bad)
            with pytest.raises(ValueError, match="num_blocks"):
                self.model.free_prefix_blocks(seq, bad)

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def free(self, data):
        seq = data.draw(st.sampled_from(sorted(self.tokens)))
        self.bm.free(seq)
        self.model.free(seq)
        del self.tokens[seq], self.computed[seq]
        with pytest.raises(KeyError):
            self.bm.free(seq)

    # -- invariants -------------------------------------------------------------
    @invariant()
    def ref_counts_match_block_tables(self):
        owners = [0] * NUM_BLOCKS
        for seq in self.tokens:
            for b in self.bm.block_table(seq).tolist():
                if b != -1:
                    owners[b] += 1
        assert [self.bm.ref_count(b) for b in range(NUM_BLOCKS)] == owners
        used = sum(1 for n in owners if n > 0)
        assert self.bm.num_free_blocks + used == NUM_BLOCKS
        assert 0 <= self.bm.num_evictable_blocks <= self.bm.num_free_blocks

    @invariant()
    def managers_agree(self):
        assert len(self.bm) == len(self.model) == len(self.tokens)
        for seq, toks in self.tokens.items():
            assert self.bm.block_table(seq).tolist() == self.model.block_table(seq).tolist()
            assert self.bm.token_ids(seq).tolist() == toks
            assert len(self.bm.block_table(seq)) == -(-len(toks) // BS)
            released = self.bm.num_released_blocks(seq)
            assert released == self.model.num_released_blocks(seq)
            assert self.bm.block_table(seq).tolist()[:released] == [-1] * released
            assert -1 not in self.bm.block_table(seq).tolist()[released:]
        for name in ("num_free_blocks", "num_evictable_blocks", "prefix_queries", "prefix_hits"):
            assert getattr(self.bm, name) == getattr(self.model, name), name

    @invariant()
    def computed_positions_read_back_their_prefix(self):
        for seq, toks in self.tokens.items():
            for pos in range(self.bm.num_released_blocks(seq) * BS, self.computed[seq]):
                assert self.kv[self._slot(seq, pos)] == tuple(toks[:pos + 1]), (seq, pos)

    def teardown(self):
        for seq in list(self.tokens):
            self.bm.free(seq)
        assert self.bm.num_free_blocks == NUM_BLOCKS
        assert all(self.bm.ref_count(b) == 0 for b in range(NUM_BLOCKS))
        assert self.bm.usage == 0.0


class NoPrefixCachingMachine(BlockManagerMachine):
    caching = False


COMMON = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow])
TestBlockManager = BlockManagerMachine.TestCase
TestBlockManager.settings = settings(max_examples=300, stateful_step_count=50, **COMMON)
TestNoPrefixCaching = NoPrefixCachingMachine.TestCase
TestNoPrefixCaching.settings = settings(max_examples=80, stateful_step_count=40, **COMMON)
