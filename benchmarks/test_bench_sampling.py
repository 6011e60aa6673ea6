"""pytest-benchmark: fused sampling (``llm_engine.bench.sampling`` has the full table).
On CUDA: fp32 logits at batch 256 with top-p and top-k + top-p; on CPU: a tiny case
through the engine's CPU path (the PyTorch reference), or the kernel when
TRITON_INTERPRET=1."""

from __future__ import annotations

import pytest
import torch
from llm_engine.kernels._utils import interpreting
from llm_engine.kernels.sampling import sample, sample_reference

from llm_engine.bench.sampling import TEMPERATURE, make_logits

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"


@pytest.mark.parametrize("filters", [{"top_p": 0.9}, {"top_k": 50, "top_p": 0.9}],
                         ids=["top_p", "top_k+top_p"])
@pytest.mark.parametrize("batch,vocab", [(256, 128256), (32, 256000), (1, 49152)])
def test_bench_sampling_cuda(benchmark, batch, vocab, filters):
    if not CUDA:
        pytest.skip("needs a CUDA GPU")
    logits = make_logits(batch, vocab, DEVICE)

    def step():
        out = sample(logits, TEMPERATURE, seed=0, **filters)
        torch.cuda.synchronize()
        return out

    tokens = benchmark(step)
    assert tokens.shape == (batch,)


def test_bench_sampling_cpu_path(benchmark):
    if CUDA:
        pytest.skip("the CUDA cases cover the kernel")
    logits = make_logits(4, 1000, DEVICE)
    fn = sample if interpreting() else sample_reference
    tokens = benchmark(lambda: fn(logits, TEMPERATURE, top_k=50, top_p=0.9, seed=0))
    assert tokens.shape == (4,)
