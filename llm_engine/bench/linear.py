"""Linear layers: TFLOP/s of ``ops.linear`` against ``F.linear``, the path the model's
projections take.

On CPU ``ops.linear`` runs oneDNN and ``F.linear`` PyTorch's default GEMM (MKL), in
fp32. Forward rows of ours use packed weights (``ops.PackedWeight``), as the engine
does; ``oneDNN, plain weight`` is the same op reordering the weight on every call,
which is also what training uses. Cases: SmolLM2-135M's projections (qkv 576→960, o 576→576, gate+up 576→3072,
down 1536→576, LM head 576→49152) at 1 row (batch-1 decode), 32 rows (32 requests
decoding) and 2048 rows (a prefill), forward under ``inference_mode``; plus the
training step (forward and backward, ``3 × 2·rows·in·out`` FLOPs) at 2048 rows.
Below 2048 rows each call takes the next of enough weight copies to fill 256 MB, so
the weights come from memory as in a real decode, not from the cache.

On CUDA ``ops.linear`` is ``F.linear`` (cuBLAS): one noted row, nothing to compare.
``rel_err``: against the product in fp64.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

from llm_engine.bench.common import OURS, Ceilings, Row, rel_error, time_ms

SUITE = "linear"
SHAPES = {"qkv": (576, 960), "o": (576, 576), "gate+up": (576, 3072), "down": (1536, 576),
          "lm_head": (576, 49152)}
COLD_BYTES = 256 << 20


def _cases(quick: bool) -> list[tuple[str, int, str]]:
    """(projection, rows, mode) triples."""
    if quick:
        return [("qkv", 1, "fwd"), ("qkv", 32, "fwd"), ("qkv", 64, "fwd+bwd")]
    cases = [(name, rows, "fwd") for rows in (1, 32, 2048) for name in SHAPES]
    return cases + [(name, 2048, "fwd+bwd") for name in SHAPES if name != "lm_head"]


def _step(fn: Callable, xs: list[torch.Tensor], ws: list[torch.Tensor], mode: str) -> Callable:
    """One timed call over every weight copy (forward, or forward and backward)."""
    if mode == "fwd":
        def run() -> torch.Tensor:
            with torch.inference_mode():
                for x, w in zip(xs, ws, strict=True):
                    y = fn(x, w)
            return y
    else:
        def run() -> torch.Tensor:
            for x, w in zip(xs, ws, strict=True):
                y = fn(x, w)
                y.backward(torch.ones_like(y))
            return y
    return run


def _packed_linear(packs: dict) -> Callable:
    """``ops.linear`` with each weight copy's own :class:`~llm_engine.ops.PackedWeight`."""
    from llm_engine import ops

    return lambda x, w: ops.linear(x, w, packed=packs[id(w)])


def iter_rows(device: str, quick: bool, ceilings: Ceilings) -> Iterator[Row]:
    from llm_engine import ops  # here: the bench CLI picks TRITON_INTERPRET before kernels load

    if torch.device(device).type == "cuda":
        yield Row(SUITE, "all", OURS, "TFLOP/s", None,
                  note="on CUDA ops.linear is F.linear (cuBLAS): nothing to compare")
        return
    gen = torch.Generator().manual_seed(0)
    for name, rows, mode in _cases(quick):
        n_in, n_out = SHAPES[name]
        copies = 1 if rows >= 2048 else max(1, COLD_BYTES // (n_in * n_out * 4))
        grad = mode == "fwd+bwd"
        ws = [torch.randn(n_out, n_in, generator=gen).mul_(n_in**-0.5).requires_grad_(grad)
              for _ in range(copies)]
        xs = [torch.randn(rows, n_in, generator=gen).requires_grad_(grad)] * copies
        exact = F.linear(xs[0].detach().double(), ws[-1].detach().double())
        flops = 2 * rows * n_in * n_out * copies * (3 if grad else 1)
        case = f"{name} {n_in}x{n_out} rows{rows} {mode}"
        params = {"rows": rows, "in": n_in, "out": n_out}
        impls = [(OURS, ops.linear, "oneDNN (ops.linear)"),
                 ("torch F.linear", F.linear, "PyTorch's default CPU GEMM (MKL)")]
        if not grad:
            impls = [(OURS, _packed_linear({id(w): ops.PackedWeight() for w in ws}),
                      "oneDNN (ops.linear), packed weights"),
                     ("oneDNN, plain weight", ops.linear, "ops.linear without packing")] + impls[1:]
        for impl, fn, note in impls:
            step = _step(fn, xs, ws, mode)
            ms = time_ms(step, device, quick=quick)
            tflops = flops / (ms * 1e-3) / 1e12
            if copies > 1:
                note += f"; {copies} weight copies, read from memory"
            yield Row(SUITE, case, impl, "TFLOP/s", tflops, ms=ms / copies,
                      ceiling_frac=tflops / ceilings.matmul_tflops,
                      rel_err=rel_error(step(), exact), note=note, params=params)
        for w in ws:
            w.grad = None


def run(device: str, quick: bool, ceilings: Ceilings) -> list[Row]:
    """Rows for every case and implementation (see the module docstring)."""
    return list(iter_rows(device, quick, ceilings))
