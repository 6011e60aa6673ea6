"""pytest-benchmark: the model's linear layers through ``ops.linear`` (oneDNN on CPU)
and through ``F.linear`` (``llm_engine.bench.linear`` has the full table with TFLOP/s
and the ratio)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llm_engine import ops


@pytest.mark.parametrize("impl", ["ops.linear", "F.linear"])
@pytest.mark.parametrize("rows", [1, 32])
def test_bench_linear(benchmark, impl, rows):
    fn = ops.linear if impl == "ops.linear" else F.linear
    x, w = torch.randn(rows, 576), torch.randn(3072, 576)
    with torch.inference_mode():
        out = benchmark(fn, x, w)
    assert out.shape == (rows, 3072)
