"""pytest-benchmark: paged decode attention (``llm_engine.bench.paged_attention`` has the
full table). On CUDA: bf16 at the long-context cases; on CPU: SmolLM2's 32-request decode
(fp32, 128 tokens each) through the engine's CPU path (``ops.paged_attention``: the C++
kernel) and through the PyTorch reference."""

from __future__ import annotations

import pytest
import torch
from llm_engine.kernels.paged_attention import paged_attention, paged_attention_reference

from llm_engine import ops
from llm_engine.bench.paged_attention import BLOCK_SIZE, _make_case

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"


def _sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


@pytest.mark.parametrize("batch,context,head_dim", [(1, 32768, 128), (16, 8192, 128),
                                                     (128, 2048, 128)])
def test_bench_paged_attention_cuda(benchmark, batch, context, head_dim):
    if not CUDA:
        pytest.skip("needs a CUDA GPU")
    args = _make_case(batch, context, head_dim, BLOCK_SIZE, torch.bfloat16, DEVICE)
    paged_attention(**args)

    def step():
        paged_attention(**args)
        _sync()

    benchmark(step)


@pytest.mark.parametrize("impl", ["ops", "reference"])
def test_bench_paged_attention_cpu_path(benchmark, impl):
    if CUDA:
        pytest.skip("the CUDA cases cover the kernel")
    args = _make_case(32, 128, 64, BLOCK_SIZE, torch.float32, DEVICE)
    fn = ops.paged_attention if impl == "ops" else paged_attention_reference
    out = benchmark(lambda: fn(**args))
    assert out.shape == args["q"].shape
