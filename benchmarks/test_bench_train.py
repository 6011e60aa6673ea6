"""pytest-benchmark: whole training steps (``llm_engine.bench.train`` has the table with
tokens/s, MFU, the plain-PyTorch and torch.compile comparisons and peak memory). On CUDA:
the gpt2-124m shape with the Triton kernels and the fused loss; on CPU: the tiny preset's
shape (short sequences) with the fused chunked loss and with the plain loss."""

from __future__ import annotations

import math

import pytest
import torch

from llm_engine.bench.common import OURS
from llm_engine.bench.train import _case, _impls, _trainer

CUDA = torch.cuda.is_available()


def test_bench_train_step_gpt2_124m_cuda(benchmark):
    if not CUDA:
        pytest.skip("needs a CUDA GPU")
    case = _case("cuda", quick=False)
    trainer = _trainer(case, _impls("cuda")[0], "cuda")
    trainer.train_step()

    def step():
        metrics = trainer.train_step()  # ends with loss.item(): synchronised
        return metrics["loss"]

    loss = benchmark(step)
    assert math.isfinite(loss)


@pytest.mark.parametrize("impl", [OURS, "plain-loss"])
def test_bench_train_step_tiny_cpu(benchmark, impl):
    if CUDA:
        pytest.skip("the CUDA case covers training steps")
    case = _case("cpu", quick=True)
    chosen = next(i for i in _impls("cpu") if i.name == impl)
    trainer = _trainer(case, chosen, "cpu")
    trainer.train_step()
    metrics = benchmark(trainer.train_step)
    assert math.isfinite(metrics["loss"])
