"""A straightforward pure-Python KV-cache block manager.

Same API and same allocation decisions as the C++ ``llm_engine._C.BlockManager``
(block order, copy-on-write, prefix-cache registration and LRU eviction), so
both give identical slots and block tables for the same calls. It is the
baseline of the ``kv_manager`` benchmark and the model in the property tests.
Prefix hashes use Python's ``hash`` of ``(parent_hash, block_tokens)``; a hit is
still checked against the stored token ids.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import numpy as np

_ROOT_HASH = 0
RELEASED_BLOCK = -1  # block-table entry of a block released by free_prefix_blocks


class UnknownSequenceError(KeyError):
    """An unknown sequence id (never allocated, or already freed)."""


class OutOfBlocksError(RuntimeError):
    """Not enough free blocks for the request."""


class _Seq:
    __slots__ = ("blocks", "tokens", "chain_hash", "num_hashed", "released")

    def __init__(self, blocks: list[int], tokens: list[int], chain_hash: int,
                 num_hashed: int, released: int = 0) -> None:
        self.blocks = blocks
        self.tokens = tokens
        self.chain_hash = chain_hash
        self.num_hashed = num_hashed
        self.released = released


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


class PyBlockManager:
    """Pure-Python twin of ``llm_engine._C.BlockManager`` (see its docstrings)."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        if block_size <= 0:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._ref = [0] * num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))
        self._lru: OrderedDict[int, None] = OrderedDict()
        self._cached: dict[int, int] = {}
        self._block_hash: dict[int, int] = {}
        self._block_tokens: dict[int, tuple[int, ...]] = {}
        self._seqs: dict[int, _Seq] = {}
        self._copies: list[tuple[int, int]] = []
        self.prefix_queries = 0
        self.prefix_hits = 0

    # -- counters -----------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self._free) + len(self._lru)

    @property
    def num_evictable_blocks(self) -> int:
        return len(self._lru)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    def ref_count(self, block_id: int) -> int:
        if not 0 <= block_id < self.num_blocks:
            raise IndexError(f"block id {block_id} is out of range [0, {self.num_blocks})")
        return self._ref[block_id]

    def __contains__(self, seq_id: int) -> bool:
        return seq_id in self._seqs

    def __len__(self) -> int:
        return len(self._seqs)

    # -- blocks -------------------------------------------------------------
    def _get(self, seq_id: int) -> _Seq:
        seq = self._seqs.get(seq_id)
        if seq is None:
            raise UnknownSequenceError(f"unknown sequence id {seq_id}")
        return seq

    def _take_block(self) -> int:
        if self._free:
            b = self._free.pop()
        else:
            b, _ = self._lru.popitem(last=False)
            del self._cached[self._block_hash.pop(b)]
            del self._block_tokens[b]
        self._ref[b] = 1
        return b

    def _release_block(self, b: int) -> None:
        self._ref[b] -= 1
        if self._ref[b] == 0:
            if b in self._block_hash:
                self._lru[b] = None
            else:
                self._free.append(b)

    def _match(self, tokens: list[int]) -> tuple[list[int], int, int]:
        blocks: list[int] = []
        chain = _ROOT_HASH
        revived = 0
        if not self.enable_prefix_caching:
            return blocks, chain, revived
        bs = self.block_size
        for i in range((len(tokens) - 1) // bs):
            key = tuple(tokens[i * bs:(i + 1) * bs])
            h = hash((chain, key))
            b = self._cached.get(h)
            if b is None or self._block_tokens[b] != key:
                break
            blocks.append(b)
            chain = h
            if self._ref[b] == 0:
                revived += 1
        return blocks, chain, revived

    @staticmethod
    def _check_prompt(tokens: Sequence[int], where: str) -> list[int]:
        tokens = [int(t) for t in tokens]
        if not tokens:
            raise ValueError(f"{where}: token_ids is empty")
        for i, t in enumerate(tokens):
            if t < 0:
                raise ValueError(f"{where}: token_ids[{i}] = {t} is negative")
        return tokens

    # -- sequences ----------------------------------------------------------
    def allocate(self, seq_id: int, token_ids: Sequence[int]) -> int:
        if seq_id in self._seqs:
            raise ValueError(f"allocate: sequence id {seq_id} is already allocated")
        tokens = self._check_prompt(token_ids, "allocate")
        hit, chain, revived = self._match(tokens)
        fresh = _ceil_div(len(tokens), self.block_size) - len(hit)
        if fresh > self.num_free_blocks - revived:
            raise OutOfBlocksError(f"allocate: sequence id {seq_id} needs {fresh} free blocks")
        blocks = []
        for b in hit:
            if self._ref[b] == 0:
                del self._lru[b]
            self._ref[b] += 1
            blocks.append(b)
        for _ in range(fresh):
            blocks.append(self._take_block())
        cached = len(hit) * self.block_size
        if self.enable_prefix_caching:
            self.prefix_queries += len(tokens)
            self.prefix_hits += cached
        self._seqs[seq_id] = _Seq(blocks, tokens, chain, len(hit))
        return cached

    def can_allocate(self, num_tokens: int) -> bool:
        if num_tokens <= 0:
            raise ValueError(f"can_allocate: num_tokens must be >= 1, got {num_tokens}")
        return _ceil_div(num_tokens, self.block_size) <= self.num_free_blocks

    def can_allocate_tokens(self, token_ids: Sequence[int]) -> bool:
        tokens = self._check_prompt(token_ids, "can_allocate_tokens")
        hit, _, revived = self._match(tokens)
        fresh = _ceil_div(len(tokens), self.block_size) - len(hit)
        return fresh <= self.num_free_blocks - revived

    def num_cached_tokens(self, token_ids: Sequence[int]) -> int:
        tokens = self._check_prompt(token_ids, "num_cached_tokens")
        return len(self._match(tokens)[0]) * self.block_size

    def _needs_block(self, seq: _Seq) -> bool:
        return len(seq.tokens) % self.block_size == 0 or self._ref[seq.blocks[-1]] > 1

    def _append(self, seq: _Seq, token: int) -> int:
        offset = len(seq.tokens) % self.block_size
        if offset == 0:
            block = self._take_block()
            seq.blocks.append(block)
        else:
            last = seq.blocks[-1]
            if self._ref[last] > 1:
                block = self._take_block()
                self._ref[last] -= 1
                self._copies.append((last, block))
                seq.blocks[-1] = block
            else:
                block = last
        seq.tokens.append(token)
        return block * self.block_size + offset

    def append_token(self, seq_id: int, token_id: int) -> int:
        seq = self._get(seq_id)
        if token_id < 0:
            raise ValueError(f"append_token: token id {token_id} is negative")
        if self._needs_block(seq) and self.num_free_blocks == 0:
            raise OutOfBlocksError(f"append_token: no free block for sequence id {seq_id}")
        return self._append(seq, token_id)

    def can_append(self, seq_id: int) -> bool:
        return not self._needs_block(self._get(seq_id)) or self.num_free_blocks > 0

    def num_blocks_to_append(self, seq_ids: Sequence[int]) -> int:
        seqs = [self._get(int(s)) for s in seq_ids]
        if len(set(map(id, seqs))) != len(seqs):
            raise ValueError("num_blocks_to_append: a sequence id appears twice in seq_ids")
        return sum(self._needs_block(s) for s in seqs)

    def append_tokens(self, seq_ids: Sequence[int], token_ids: Sequence[int]) -> np.ndarray:
        if len(seq_ids) != len(token_ids):
            raise ValueError("seq_ids and token_ids must have the same length")
        seqs = [self._get(int(s)) for s in seq_ids]
        if len(set(map(id, seqs))) != len(seqs):
            raise ValueError("append_tokens: a sequence id appears twice in seq_ids")
        if any(int(t) < 0 for t in token_ids):
            raise ValueError("append_tokens: negative token id")
        needed = sum(self._needs_block(s) for s in seqs)
        if needed > self.num_free_blocks:
            raise OutOfBlocksError(f"append_tokens: the batch needs {needed} free blocks")
        slots = [self._append(s, int(t)) for s, t in zip(seqs, token_ids, strict=True)]
        return np.array(slots, dtype=np.int64)

    def fork(self, parent_id: int, child_id: int) -> None:
        parent = self._get(parent_id)
        if child_id in self._seqs:
            raise ValueError(f"fork: child sequence id {child_id} is already allocated")
        for b in parent.blocks:
            if b != RELEASED_BLOCK:
                self._ref[b] += 1
        self._seqs[child_id] = _Seq(list(parent.blocks), list(parent.tokens),
                                    parent.chain_hash, parent.num_hashed, parent.released)

    def free(self, seq_id: int) -> None:
        seq = self._seqs.pop(seq_id, None)
        if seq is None:
            raise UnknownSequenceError(f"free: unknown sequence id {seq_id}")
        for b in reversed(seq.blocks):
            if b != RELEASED_BLOCK:
                self._release_block(b)

    def free_prefix_blocks(self, seq_id: int, num_blocks: int) -> int:
        seq = self._get(seq_id)
        full = len(seq.tokens) // self.block_size
        if not 0 <= num_blocks <= full:
            raise ValueError(f"free_prefix_blocks: num_blocks = {num_blocks} must lie in "
                             f"[0, {full}], the full blocks of sequence id {seq_id}")
        start = seq.released
        for i in range(num_blocks - 1, start - 1, -1):
            self._release_block(seq.blocks[i])
            seq.blocks[i] = RELEASED_BLOCK
        seq.released = max(start, num_blocks)
        return max(0, num_blocks - start)

    def num_released_blocks(self, seq_id: int) -> int:
        return self._get(seq_id).released

    def block_table(self, seq_id: int) -> np.ndarray:
        return np.array(self._get(seq_id).blocks, dtype=np.int32)

    def token_ids(self, seq_id: int) -> np.ndarray:
        return np.array(self._get(seq_id).tokens, dtype=np.int32)

    def num_tokens(self, seq_id: int) -> int:
        return len(self._get(seq_id).tokens)

    def take_pending_copies(self) -> list[tuple[int, int]]:
        copies, self._copies = self._copies, []
        return copies

    # -- steps --------------------------------------------------------------
    def _register(self, seq: _Seq, computed: int) -> None:
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        full = computed // bs
        for i in range(seq.num_hashed, full):
            key = tuple(seq.tokens[i * bs:(i + 1) * bs])
            h = hash((seq.chain_hash, key))
            seq.chain_hash = h
            b = seq.blocks[i]
            if b != RELEASED_BLOCK and b not in self._block_hash and h not in self._cached:
                self._cached[h] = b
                self._block_hash[b] = h
                self._block_tokens[b] = key
        seq.num_hashed = max(seq.num_hashed, full)

    def prepare_step(self, seq_ids: Sequence[int], starts: Sequence[int], ends: Sequence[int],
                     max_blocks: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if not len(seq_ids) == len(starts) == len(ends):
            raise ValueError("seq_ids, starts and ends must have the same length")
        seqs = [self._get(int(s)) for s in seq_ids]
        if len(set(map(id, seqs))) != len(seqs):
            raise ValueError("prepare_step: a sequence id appears twice in seq_ids")
        bs = self.block_size
        need = 0
        for seq, start, end in zip(seqs, starts, ends, strict=True):
            if not 0 <= start <= end <= len(seq.tokens):
                raise ValueError(f"prepare_step: positions [{start}, {end}) out of range")
            if start < end and start < seq.released * bs:
                raise ValueError(f"prepare_step: position {start} lies in a released block")
            need = max(need, _ceil_div(end, bs))
        width = need if max_blocks is None else max_blocks
        if width < need:
            raise ValueError(f"prepare_step: max_blocks = {width} is smaller than {need}")
        slots: list[int] = []
        tables: list[list[int]] = []
        for seq, start, end in zip(seqs, starts, ends, strict=True):
            blocks = seq.blocks
            slots.extend(blocks[p // bs] * bs + p % bs for p in range(start, end))
            used = _ceil_div(end, bs)
            tables.append(blocks[:used] + [-1] * (width - used))
            self._register(seq, end)
        return (np.array(slots, dtype=np.int64),
                np.array(tables, dtype=np.int32).reshape(len(seqs), width),
                np.array(ends, dtype=np.int32))
