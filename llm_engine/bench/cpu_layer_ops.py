"""The C++ CPU layer ops of fp32 inference: GB/s against the PyTorch references.

Ops, at SmolLM2-135M's widths: ``rms_norm+residual`` (hidden 576: reads x, residual and
the weight, writes the output and the sum), ``silu_mul`` (SwiGLU over the fused
gate|up output, 2 × 1536 wide: reads both halves, writes one), ``rope`` (q and k heads,
12 × 64, a slice of the 960-wide QKV output: reads them and their cos/sin factors,
writes the rotated heads) and ``store_kv`` (3 K/V heads × 64 per token into a 16-token
block cache at shuffled slots: reads and writes K and V). Rows: 1 (batch-1 decode),
32 (32 requests decoding) and 2048 (a prefill); forward under ``inference_mode``.

``llm_engine`` is what ``ops`` runs there (the kernels of ``csrc/cpu/``); ``torch`` is
the plain-PyTorch reference of the same op (``rms_norm_reference``,
``silu_mul_reference``, ``apply_rope_reference``, ``store_kv_cache_reference``). Both
include their Python call: at 1 and 32 rows that is most of the time, as it is in a
decode step. CPU only: on CUDA the norms are the Triton kernels of their own suite.
``rel_err``: against the reference in fp64.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from llm_engine.bench.common import OURS, Ceilings, Row, rel_error, time_ms

SUITE = "cpu_layer_ops"
HIDDEN, INTERMEDIATE, HEADS, KV_HEADS, HEAD_DIM, BLOCK_SIZE = 576, 1536, 9, 3, 64, 16


def _rows(quick: bool) -> list[int]:
    return [1, 32] if quick else [1, 32, 2048]


def _cases(rows: int, gen: torch.Generator) -> Iterator[tuple[str, int, Callable, Callable,
                                                               Callable]]:
    """(op, bytes moved, ours, reference, exact) per op; each callable takes no argument
    and returns the op's output."""
    from llm_engine import ops  # here: the bench CLI picks TRITON_INTERPRET before kernels load
    from llm_engine.kernels.layer_norm import rms_norm_reference
    from llm_engine.kernels.paged_attention import store_kv_cache_reference

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen)

    x, residual, weight = randn(rows, HIDDEN), randn(rows, HIDDEN), randn(HIDDEN)
    yield ("rms_norm+residual", 4 * (4 * rows * HIDDEN + HIDDEN),
           lambda: ops.rms_norm(x, weight, 1e-5, residual=residual)[0],
           lambda: rms_norm_reference(x, weight, 1e-5, residual=residual)[0],
           lambda: rms_norm_reference(x.double(), weight.double(), 1e-5,
                                      residual=residual.double())[0])

    h = randn(rows, 2 * INTERMEDIATE)
    yield ("silu_mul", 4 * 3 * rows * INTERMEDIATE, lambda: ops.silu_mul(h),
           lambda: ops.silu_mul_reference(h), lambda: ops.silu_mul_reference(h.double()))

    qk_heads = HEADS + KV_HEADS
    qkv = randn(rows, (qk_heads + KV_HEADS) * HEAD_DIM)
    qk = qkv[:, :qk_heads * HEAD_DIM].view(rows, qk_heads, HEAD_DIM)
    positions = torch.randint(0, 2048, (rows,), generator=gen)
    factors = ops.rope_at(positions, *ops.rope_cos_sin(HEAD_DIM, 2048, 100000.0))

    yield ("rope", 4 * (2 * rows * qk_heads * HEAD_DIM + 2 * rows * HEAD_DIM),
           lambda: ops.apply_rope(qk, *factors), lambda: ops.apply_rope_reference(qk, *factors),
           lambda: ops.apply_rope_reference(qk.double(), *(f.double() for f in factors)))

    num_blocks = -(-rows // BLOCK_SIZE) + 1
    k = qkv[:, qk_heads * HEAD_DIM - KV_HEADS * HEAD_DIM:qk_heads * HEAD_DIM].view(
        rows, KV_HEADS, HEAD_DIM)
    v = qkv[:, qk_heads * HEAD_DIM:].view(rows, KV_HEADS, HEAD_DIM)
    slots = torch.randperm(num_blocks * BLOCK_SIZE, generator=gen)[:rows]
    caches = [torch.zeros(num_blocks, BLOCK_SIZE, KV_HEADS, HEAD_DIM) for _ in range(2)]

    expected = torch.zeros(num_blocks * BLOCK_SIZE, KV_HEADS, HEAD_DIM, dtype=torch.float64)
    expected[slots] = v.double()  # the V cache after a store into zeros

    def stored(store: Callable) -> Callable:
        def run() -> torch.Tensor:  # every run writes the same rows: the result stays put
            store(k, v, *caches, slots)
            return caches[1].view(expected.shape)
        return run

    yield ("store_kv", 4 * 4 * rows * KV_HEADS * HEAD_DIM, stored(ops.store_kv_cache),
           stored(store_kv_cache_reference), lambda: expected)


def iter_rows(device: str, quick: bool, ceilings: Ceilings) -> Iterator[Row]:
    if torch.device(device).type == "cuda":
        yield Row(SUITE, "all", OURS, "GB/s", None,
                  note="CPU kernels: on CUDA the norms are Triton kernels (the layer_norm "
                       "suite) and the other ops run in PyTorch")
        return
    gen = torch.Generator().manual_seed(0)
    for rows in _rows(quick):
        for op, nbytes, ours, reference, exact in _cases(rows, gen):
            params = {"rows": rows}
            case = f"{op} rows{rows}"
            with torch.inference_mode():
                for impl, fn, note in ((OURS, ours, "C++ (csrc/cpu/) through ops"),
                                       ("torch", reference, "the plain-PyTorch reference")):
                    ms = time_ms(fn, device, quick=quick)
                    gbps = nbytes / (ms * 1e-3) / 1e9
                    yield Row(SUITE, case, impl, "GB/s", gbps, ms=ms,
                              ceiling_frac=gbps / ceilings.bandwidth_gbps,
                              rel_err=rel_error(fn(), exact()), note=note, params=params)


def run(device: str, quick: bool, ceilings: Ceilings) -> list[Row]:
    """Rows for every op, row count and implementation (see the module docstring)."""
    return list(iter_rows(device, quick, ceilings))
