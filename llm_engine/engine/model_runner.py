"""One scheduled step through the model: input tensors, attention metadata, logits.

The runner reads and writes the paged K/V cache (:class:`~llm_engine.kv_cache.KVCache`:
one ``(k, v)`` pair per layer, each ``(num_blocks, block_size, kv_heads, head_dim)``),
performs its copy-on-write block copies, turns a
:class:`~llm_engine.engine.scheduler.ScheduledBatch` into the model's flat
inputs with vectorised numpy (no per-token Python), runs the forward, and
computes logits only for the last position of the sequences that sample.

On CUDA, pure-decode steps replay CUDA graphs captured once per batch-size
bucket (1, 2, 4, 8, 16, 32, 48, ... up to ``max_num_seqs``, each captured the
first time it is needed) over static input
buffers; a batch is padded to its bucket with slot ``-1`` (nothing stored) and
context length 0 (zero attention output).
"""

from __future__ import annotations

import numpy as np
import torch

from llm_engine.engine.scheduler import ScheduledBatch
from llm_engine.kv_cache import KVCache
from llm_engine.model import AttentionMetadata, Transformer


class ModelRunner:
    """Runs scheduled batches through ``model`` over the paged ``kv_cache``."""

    def __init__(self, model: Transformer, kv_cache: KVCache, max_num_seqs: int,
                 max_model_len: int, use_cuda_graphs: bool) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.block_manager = kv_cache.manager
        self.block_size = kv_cache.block_size
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        if self.device.type == "cpu" and self.dtype == torch.float32:
            model.pack_weights()  # faster CPU matmuls for a second copy of the weights
        self.max_model_len = max_model_len
        self.max_blocks_per_seq = -(-self.max_model_len // self.block_size)
        self.kv_caches = [kv_cache.layer(i) for i in range(kv_cache.num_layers)]
        self.decoder = model.decoder_stack(self.kv_caches)
        # CUDA graphs, captured lazily the first time a batch-size bucket is needed.
        self.graph_sizes = self._graph_buckets(max_num_seqs) if (
            use_cuda_graphs and self.device.type == "cuda") else []
        self.graphs: dict[int, _DecodeGraph] = {}
        self._graph_pool = None

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> torch.Tensor:
        """Run one step; returns fp32 logits ``(num_sampling_seqs, vocab)`` for the
        sequences with ``batch.sample`` set, in batch order."""
        if batch.copies:
            self.kv_cache.copy_blocks(batch.copies)
        seq_ids = np.fromiter((s.seq_id for s in batch.seqs), dtype=np.int64,
                              count=len(batch.seqs))
        if batch.is_decode and self.graph_sizes and len(batch.seqs) <= self.graph_sizes[-1]:
            return self._execute_graph(batch, seq_ids)
        slot_mapping, block_tables, context_lens = self.block_manager.prepare_step(
            seq_ids, batch.starts, batch.ends)
        lens = batch.ends - batch.starts
        cu = np.zeros(len(lens) + 1, dtype=np.int32)
        np.cumsum(lens, out=cu[1:])
        total = int(cu[-1])
        if batch.is_decode:
            input_ids = np.fromiter((s.token_ids[-1] for s in batch.seqs), dtype=np.int64,
                                    count=len(batch.seqs))
            positions = batch.starts
        else:
            input_ids = np.concatenate([
                np.asarray(s.token_ids[a:b], dtype=np.int64)
                for s, a, b in zip(batch.seqs, batch.starts.tolist(), batch.ends.tolist(), strict=True)
            ])
            positions = np.repeat(batch.starts - cu[:-1], lens) + np.arange(total)
        cu_t = self._to_device(cu)
        attn = AttentionMetadata(
            cu_seqlens_q=cu_t,
            cu_seqlens_k=cu_t,
            max_seqlen_q=int(lens.max()),
            max_seqlen_k=int(batch.ends.max()),
            slot_mapping=self._to_device(slot_mapping),
            block_tables=self._to_device(block_tables),
            context_lens=self._to_device(context_lens),
            is_decode=batch.is_decode,
            has_cached_prefix=bool(batch.starts.any()),
        )
        hidden = self.model(self._to_device(input_ids), self._to_device(positions), attn,
                            self.kv_caches, self.decoder)
        last = cu[1:][batch.sample] - 1
        if len(last) != total:
            hidden = hidden[self._to_device(last.astype(np.int64))]
        return self.model.compute_logits(hidden, decode=batch.is_decode).float()

    def _to_device(self, a: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(np.ascontiguousarray(a))
        return t.to(self.device, non_blocking=True) if self.device.type != "cpu" else t

    # -- CUDA graphs for decode --------------------------------------------------------
    @staticmethod
    def _graph_buckets(max_num_seqs: int) -> list[int]:
        sizes = [b for b in (1, 2, 4, 8) if b < max_num_seqs]
        sizes += list(range(16, max_num_seqs, 16)) + [max_num_seqs]
        return sorted(set(sizes))

    def _execute_graph(self, batch: ScheduledBatch, seq_ids: np.ndarray) -> torch.Tensor:
        n = len(batch.seqs)
        bs = next(b for b in self.graph_sizes if b >= n)
        graph = self.graphs.get(bs)
        if graph is None:
            # One memory pool for all graphs: they never run concurrently, and each
            # graph's output is read before the next replay.
            graph = self.graphs[bs] = _DecodeGraph(self, bs, self._graph_pool)
            self._graph_pool = graph.graph.pool()
        slot_mapping, block_tables, context_lens = self.block_manager.prepare_step(
            seq_ids, batch.starts, batch.ends, self.max_blocks_per_seq)
        input_ids = np.fromiter((s.token_ids[-1] for s in batch.seqs), dtype=np.int64, count=n)
        graph.replay(n, input_ids, batch.starts, slot_mapping, block_tables, context_lens)
        return self.model.compute_logits(graph.hidden[:n]).float()


class _DecodeGraph:
    """A CUDA graph of one decode forward at a fixed batch size over static buffers."""

    def __init__(self, runner: ModelRunner, batch_size: int, pool) -> None:
        dev = runner.device
        self.batch_size = batch_size
        self.input_ids = torch.zeros(batch_size, dtype=torch.long, device=dev)
        self.positions = torch.zeros(batch_size, dtype=torch.long, device=dev)
        self.slot_mapping = torch.full((batch_size,), -1, dtype=torch.long, device=dev)
        self.block_tables = torch.zeros(batch_size, runner.max_blocks_per_seq, dtype=torch.int32,
                                        device=dev)
        self.context_lens = torch.zeros(batch_size, dtype=torch.int32, device=dev)
        cu = torch.arange(batch_size + 1, dtype=torch.int32, device=dev)
        self.attn = AttentionMetadata(
            cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=1,
            max_seqlen_k=runner.max_blocks_per_seq * runner.block_size,
            slot_mapping=self.slot_mapping, block_tables=self.block_tables,
            context_lens=self.context_lens, is_decode=True, has_cached_prefix=True,
        )
        model, caches = runner.model, runner.kv_caches
        self.context_lens.fill_(1)
        with torch.inference_mode():
            model(self.input_ids, self.positions, self.attn, caches)  # warm-up (autotune, JIT)
            torch.cuda.synchronize(dev)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph, pool=pool):
                self.hidden = model(self.input_ids, self.positions, self.attn, caches)
        torch.cuda.synchronize(dev)
        self.context_lens.zero_()

    def replay(self, n: int, input_ids: np.ndarray, positions: np.ndarray,
               slot_mapping: np.ndarray, block_tables: np.ndarray,
               context_lens: np.ndarray) -> None:
        self.input_ids[:n].copy_(torch.from_numpy(input_ids), non_blocking=True)
        self.positions[:n].copy_(torch.from_numpy(positions), non_blocking=True)
        self.slot_mapping[:n].copy_(torch.from_numpy(slot_mapping), non_blocking=True)
        self.block_tables[:n].copy_(torch.from_numpy(block_tables), non_blocking=True)
        self.context_lens[:n].copy_(torch.from_numpy(context_lens), non_blocking=True)
        if n < self.batch_size:
            self.slot_mapping[n:].fill_(-1)
            self.context_lens[n:].zero_()
        self.graph.replay()
