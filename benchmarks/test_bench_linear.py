"""pytest-benchmark: the model's linear layers through ``ops.linear`` (oneDNN on CPU),
with and without a packed weight, and through ``F.linear`` (``llm_engine.bench.linear``
has the full table with TFLOP/s and the ratio)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llm_engine import ops


@pytest.mark.parametrize("impl", ["ops.linear packed", "ops.linear", "F.linear"])
@pytest.mark.parametrize("rows", [1, 32])
def test_bench_linear(benchmark, impl, rows):
    packed = ops.PackedWeight()
    fns = {"ops.linear packed": lambda x, w: ops.linear(x, w, packed=packed),
           "ops.linear": ops.linear, "F.linear": F.linear}
    fn = fns[impl]
    x, w = torch.randn(rows, 576), torch.randn(3072, 576)
    with torch.inference_mode():
        out = benchmark(fn, x, w)
    assert out.shape == (rows, 3072)
