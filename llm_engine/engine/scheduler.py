"""Which sequences run in the next step, and which tokens of each.

Continuous batching: every step is one flat batch holding one decode token for
each running sequence, the next chunk of any prompt still being computed, and
the first chunk of newly admitted sequences, bounded by
``max_num_batched_tokens`` (chunked prefill). Sequences join and leave between
steps.

Memory is KV blocks (:class:`llm_engine._C.BlockManager`). A sequence is
admitted only when the blocks for all its tokens are free (counting prefix-cache
hits). When a running sequence needs a new block for its next token and none is
free, the newest running sequence is preempted: its blocks are freed and it goes
back to the front of the queue, to be recomputed (prompt and generated tokens)
when admitted again. A request that cannot fit even alone is refused when it is
added, so the engine never deadlocks.

Sliding window: when every layer of the model attends only to the last
``kv_window`` positions, a query at position ``p`` reads keys ``p - kv_window < j
<= p``. Once a sequence has computed ``c`` tokens its next query is at ``c``, so
the blocks wholly before position ``c - kv_window + 1`` are never read again:
after each step they go back to the pool (``BlockManager.free_prefix_blocks``,
as vLLM's sliding-window manager swaps them for a null block). Their block-table
entries become -1, so the tables keep their logical indexing; every attention
path starts reading at the window, so it never loads a released entry. A long
generation then holds about ``ceil(kv_window / block_size) + 1`` blocks. Forks
share only the blocks still held, a shared block only loses one reference, and
a released block of the prefix cache stays cached until evicted. A preempted
sequence frees what it holds and is recomputed from its first token.

The scheduler owns every change of a sequence's state: it admits, preempts,
records computed tokens, forks ``n > 1`` requests, appends sampled tokens
(asking the :class:`~llm_engine.engine.stop_checker.StopChecker` whether the
sequence ends) and finishes or aborts sequences, freeing their blocks at once.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from llm_engine._C import BlockManager
from llm_engine.engine.sequence import Request, Sequence, Status
from llm_engine.engine.stop_checker import StopChecker


@dataclass
class ScheduledBatch:
    """One step's work: positions ``[starts[i], ends[i])`` of ``seqs[i]``.

    ``sample[i]``: the chunk reaches the end of the sequence's tokens, so its last
    position's logits give the sequence's next token. ``copies``: copy-on-write
    block copies ``(src, dst)`` to perform on the K/V cache before the forward.
    """

    seqs: list[Sequence]
    starts: np.ndarray  # int64 (n,)
    ends: np.ndarray  # int64 (n,)
    sample: np.ndarray  # bool (n,)
    copies: list[tuple[int, int]] = field(default_factory=list)
    is_decode: bool = field(init=False)  # every sequence computes one token after cached ones

    def __post_init__(self) -> None:
        self.is_decode = bool(np.all(self.ends - self.starts == 1) and np.all(self.starts > 0))


class Scheduler:
    """Admission, chunked prefill and preemption over one block manager."""

    def __init__(self, block_manager: BlockManager, max_num_seqs: int,
                 max_num_batched_tokens: int, stop_checker: StopChecker,
                 kv_window: int | None = None) -> None:
        self.block_manager = block_manager
        # Every layer's sliding window (None: some layer sees all tokens, release nothing).
        self.kv_window = kv_window
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.stop_checker = stop_checker
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # admission order: the last is the newest
        self.num_preemptions = 0
        self._seq_ids = itertools.count()

    def __len__(self) -> int:
        return len(self.waiting) + len(self.running)

    def new_seq_id(self) -> int:
        """A sequence id the block manager has never seen."""
        return next(self._seq_ids)

    def add(self, seq: Sequence) -> None:
        """Queue a new sequence; it is admitted when slots and blocks allow."""
        self.waiting.append(seq)

    def finish(self, seq: Sequence, reason: str, stop_reason: str | int | None = None) -> None:
        """End a sequence wherever it is and free its blocks at once."""
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
            self.block_manager.free(seq.seq_id)
        elif seq.status is Status.WAITING and seq in self.waiting:
            self.waiting.remove(seq)
        seq.status = Status.FINISHED
        seq.finish_reason, seq.stop_reason = reason, stop_reason
        seq.request.num_finished_seqs += 1

    def abort(self, request: Request) -> None:
        """End every unfinished sequence of ``request`` (finish reason ``"abort"``); a
        request not forked yet gets no more sequences."""
        request.aborted = True
        request.forked = True
        for seq in request.seqs:
            if not seq.is_finished:
                self.finish(seq, "abort")

    def complete_step(self, batch: ScheduledBatch) -> tuple[list[int], list[Sequence]]:
        """Record that ``batch`` ran (its K/V is cached) and fork the requests with
        ``n > 1`` whose prompt just finished: each child samples from its parent's
        logits row. Returns (logits row, sequence) of every sequence that samples now;
        the rows index the logits of the sequences with ``batch.sample`` set."""
        rows: list[int] = []
        seqs: list[Sequence] = []
        row = 0
        for seq, end, sample in zip(batch.seqs, batch.ends.tolist(), batch.sample.tolist(),
                                    strict=True):
            seq.num_computed_tokens = end
            if self.kv_window is not None:
                self._release_out_of_window(seq)
            if not sample:
                continue
            rows.append(row)
            seqs.append(seq)
            request = seq.request
            if not request.forked:
                request.forked = True
                for index in range(1, request.params.n):
                    child = seq.fork(self.new_seq_id(), index, request.seeds[index])
                    self.block_manager.fork(seq.seq_id, child.seq_id)
                    self.running.append(child)
                    request.seqs.append(child)
                    rows.append(row)
                    seqs.append(child)
            row += 1
        return rows, seqs

    def _release_out_of_window(self, seq: Sequence) -> None:
        """Release the blocks that lie wholly before the window of ``seq``'s next query
        (position ``num_computed_tokens``; it reads keys from ``num_computed_tokens -
        kv_window + 1`` on)."""
        skipped = seq.num_computed_tokens - self.kv_window + 1
        if skipped >= self.block_manager.block_size:
            self.block_manager.free_prefix_blocks(seq.seq_id,
                                                  skipped // self.block_manager.block_size)

    def append(self, seq: Sequence, token: int, logprobs: dict[int, float] | None,
               now: float) -> None:
        """Add a sampled token to ``seq``; finish it (freeing its blocks) if it stops."""
        seq.append_token(token, logprobs, now)
        stop = self.stop_checker.check(seq)
        if stop is not None:
            self.finish(seq, *stop)

    def schedule(self) -> ScheduledBatch:
        budget = self.max_num_batched_tokens
        items: list[tuple[Sequence, int, int]] = []  # (seq, start, end)

        # 1. One decode token per running sequence that has finished its prompt.
        victims = self._reserve_decode_slots()
        for seq in self.running:
            if seq.num_tokens - seq.num_computed_tokens == 1:
                items.append((seq, seq.num_computed_tokens, seq.num_tokens))
                budget -= 1
        for seq in victims:  # newest first, so the oldest ends up at the front
            self.waiting.appendleft(seq)

        # 2. The next chunk of prompts being computed (chunked prefill).
        for seq in self.running:
            remaining = seq.num_tokens - seq.num_computed_tokens
            if remaining > 1 and budget > 0:
                take = min(remaining, budget)
                items.append((seq, seq.num_computed_tokens, seq.num_computed_tokens + take))
                budget -= take

        # 3. Admit waiting sequences while tokens, sequence slots and blocks allow. A
        # request not forked yet holds the slots of all n of its sequences.
        occupied = sum(self._slots(seq) for seq in self.running) if self.waiting else 0
        while self.waiting and budget > 0 and not victims:
            seq = self.waiting[0]
            slots = self._slots(seq)
            if self.running and occupied + slots > self.max_num_seqs:
                break
            if not self.block_manager.can_allocate_tokens(seq.token_ids):
                break
            self.waiting.popleft()
            cached = self.block_manager.allocate(seq.seq_id, seq.token_ids)
            seq.status = Status.RUNNING
            seq.num_computed_tokens = cached
            seq.num_allocated_tokens = seq.num_tokens
            if seq.request.metrics.first_scheduled_time is None:
                seq.request.num_cached_tokens = cached
            self.running.append(seq)
            occupied += slots
            take = min(seq.num_tokens - cached, budget)
            items.append((seq, cached, cached + take))
            budget -= take

        seqs = [it[0] for it in items]
        now = time.perf_counter()
        for seq in seqs:
            if seq.request.metrics.first_scheduled_time is None:
                seq.request.metrics.first_scheduled_time = now
        starts = np.fromiter((it[1] for it in items), dtype=np.int64, count=len(items))
        ends = np.fromiter((it[2] for it in items), dtype=np.int64, count=len(items))
        totals = np.fromiter((s.num_tokens for s in seqs), dtype=np.int64, count=len(items))
        return ScheduledBatch(
            seqs=seqs,
            starts=starts,
            ends=ends,
            sample=ends == totals,
            copies=self.block_manager.take_pending_copies(),
        )

    @staticmethod
    def _slots(seq: Sequence) -> int:
        """The sequence slots ``seq`` takes: its request's ``n`` until the fork."""
        return 1 if seq.request.forked else seq.params.n

    def _reserve_decode_slots(self) -> list[Sequence]:
        """Give the block manager the newest token of every decoding sequence (the token
        this step computes), preempting the newest sequences when blocks run out.
        Returns the preempted sequences, newest first."""
        bm = self.block_manager
        pending = [s for s in self.running if s.num_allocated_tokens < s.num_tokens]
        if not pending:
            return []
        ids = np.fromiter((s.seq_id for s in pending), dtype=np.int64, count=len(pending))
        if bm.num_blocks_to_append(ids) <= bm.num_free_blocks:  # the common case: one call
            bm.append_tokens(ids, np.fromiter((s.token_ids[-1] for s in pending),
                                              dtype=np.int32, count=len(pending)))
            for seq in pending:
                seq.num_allocated_tokens += 1
            return []
        victims: list[Sequence] = []
        for seq in pending:  # oldest first
            if seq.status is not Status.RUNNING:
                continue  # already preempted to make room for an older one
            if not self._make_room_for(seq, victims):
                break  # seq itself was the newest, so nothing after it remains
            bm.append_token(seq.seq_id, seq.token_ids[-1])
            seq.num_allocated_tokens += 1
        return victims

    def _make_room_for(self, seq: Sequence, victims: list[Sequence]) -> bool:
        """Preempt the newest running sequences until ``seq`` can append its next token.
        False when ``seq`` itself had to be preempted."""
        while not self.block_manager.can_append(seq.seq_id):
            victim = self.running.pop()
            self.block_manager.free(victim.seq_id)
            victim.status = Status.WAITING
            victim.num_computed_tokens = 0
            victim.num_allocated_tokens = 0
            victims.append(victim)
            self.num_preemptions += 1
            if victim is seq:
                return False
        return True
