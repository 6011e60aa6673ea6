"""Batch-invariant ops: a token's numbers do not depend on what else is in the batch.

The engine decodes a token in a batch of other requests' tokens (one row per sequence,
paged decode attention, oneDNN matmuls of a few rows); the trainer recomputes the same
token in a full-sequence forward (hundreds of rows, SDPA). Their kernels reduce in
different orders, so the log-probs differ in the last bits. Inside :func:`enabled`, the
op registry (:mod:`llm_engine.ops`) runs the ``rowwise`` implementation of every op
whose result could depend on the batch, so every token goes through calls of identical
shapes whatever the batch:

- linear layers one row at a time (``F.linear`` on a fresh ``(1, in)`` row, the weight
  itself, never the packed copy); RMSNorm / LayerNorm, SwiGLU and RoPE one row at a time;
- attention one query at a time over exactly its own keys, in position order: the
  engine's paged decode and prefill gather the sequence's K/V from the cache blocks,
  the trainer's full forward slices them from the sequence.

Identical shapes take identical code paths, so the engine's sampling log-probs equal
the trainer's recomputed ones bit for bit (tests compare the bits). It costs speed:
every row reads each weight matrix on its own. The choice is an ``ops.use`` block: it
holds in this thread (or async task) only, nests, and ``llm-engine backends`` lists the
``rowwise`` implementations.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from llm_engine import ops

# The ops whose results could depend on the batch around a token; each has ``rowwise``.
OPS = ("linear", "rms_norm", "layer_norm", "silu_mul", "apply_rope", "attention_varlen",
       "paged_attention", "paged_prefill_attention")


@contextlib.contextmanager
def enabled(on: bool = True) -> Iterator[None]:
    """Within the block, the ops of :data:`OPS` run their ``rowwise`` implementations
    (``on=False``: a no-op, for call sites that take a flag)."""
    if not on:
        yield
        return
    with ops.use(**dict.fromkeys(OPS, "rowwise")):
        yield
