"""pytest-benchmark: the fused MoE kernel (``llm_engine.bench.moe`` has the full table with
TFLOP/s, the reference loop and vLLM). On CUDA: Mixtral's expert shapes in bf16; on CPU: a
tiny case through the engine's CPU path (the reference loop), or the kernel when
TRITON_INTERPRET=1."""

from __future__ import annotations

import pytest
import torch
from llm_engine.kernels._utils import interpreting
from llm_engine.kernels.moe import fused_moe, moe_reference, route_topk

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"


def _inputs(tokens: int, hidden: int, width: int, num_experts: int, top_k: int,
            dtype: torch.dtype):
    x = torch.randn(tokens, hidden, device=DEVICE, dtype=dtype)
    up = torch.randn(num_experts, 2 * width, hidden, device=DEVICE, dtype=dtype) * hidden**-0.5
    down = torch.randn(num_experts, hidden, width, device=DEVICE, dtype=dtype) * width**-0.5
    weights, experts = route_topk(torch.randn(tokens, num_experts, device=DEVICE), top_k, True)
    return x, up, down, weights, experts


@pytest.mark.parametrize("impl", ["fused", "reference"])
@pytest.mark.parametrize("tokens", [1, 256, 4096])
def test_bench_moe_cuda(benchmark, tokens, impl):
    if not CUDA:
        pytest.skip("needs a CUDA GPU")
    args = _inputs(tokens, 4096, 14336, 8, 2, torch.bfloat16)
    fn = fused_moe if impl == "fused" else moe_reference

    def step():
        fn(*args)
        torch.cuda.synchronize()

    step()
    benchmark(step)


def test_bench_moe_cpu_path(benchmark):
    if CUDA:
        pytest.skip("the CUDA cases cover the kernel")
    args = _inputs(16, 64, 96, 6, 2, torch.float32)
    fn = fused_moe if interpreting() else moe_reference
    out = benchmark(lambda: fn(*args))
    assert out.shape == (16, 64)
