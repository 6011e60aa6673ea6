"""pytest-benchmark: the C++ CPU layer ops and their PyTorch references at the 32 rows of
a batched decode (``llm_engine.bench.cpu_layer_ops`` has the full table with GB/s and
the ratio)."""

from __future__ import annotations

import pytest
import torch

from llm_engine.bench.cpu_layer_ops import _cases


@pytest.mark.parametrize("impl", ["ours", "reference"])
@pytest.mark.parametrize("op", ["rms_norm+residual", "silu_mul", "rope", "store_kv"])
def test_bench_cpu_layer_op(benchmark, op, impl):
    cases = {name: (ours, ref) for name, _, ours, ref, _ in
             _cases(32, torch.Generator().manual_seed(0))}
    ours, ref = cases[op]
    with torch.inference_mode():
        out = benchmark(ours if impl == "ours" else ref)
    assert out.shape[0] > 0
