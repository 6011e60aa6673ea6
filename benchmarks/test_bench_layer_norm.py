"""pytest-benchmark: LayerNorm / RMSNorm (``llm_engine.bench.layer_norm`` has the full table
with GB/s and the references). On CUDA: bf16 forward and forward+backward at large shapes;
on CPU: a tiny case through the engine's CPU path (the PyTorch reference), or the kernel
when TRITON_INTERPRET=1."""

from __future__ import annotations

import pytest
import torch
from llm_engine.kernels._utils import interpreting

from llm_engine.bench.layer_norm import VARIANTS, _Case, _ours, _reference

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"


def _sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("rows,hidden", [(4096, 1024), (16384, 4096), (32768, 8192)])
def test_bench_layer_norm_cuda(benchmark, rows, hidden, variant, backward):
    if not CUDA:
        pytest.skip("needs a CUDA GPU")
    case = _Case(variant, rows, hidden, torch.bfloat16, DEVICE)
    impl = _ours(variant)

    def step():
        outs = case.forward(impl)
        if backward:
            case.backward(outs)
        _sync()

    step()
    benchmark(step)


@pytest.mark.parametrize("variant", VARIANTS)
def test_bench_layer_norm_cpu_path(benchmark, variant):
    if CUDA:
        pytest.skip("the CUDA cases cover the kernel")
    case = _Case(variant, 32, 128, torch.float32, DEVICE)
    impl = _ours(variant) if interpreting() else _reference(variant)
    outs = benchmark(lambda: case.backward(case.forward(impl)))
    assert outs.shape == (32, 128)
