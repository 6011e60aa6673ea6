"""pytest-benchmark timings of the fused attention kernel, forward and forward+backward.

On CUDA: bf16, 16k tokens (batch × seqlen), 2048 hidden, causal. On CPU the
kernel runs in the Triton interpreter on a tiny shape (a smoke run, not a
speed figure).
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from llm_engine.kernels._utils import interpreting  # noqa: E402
from llm_engine.kernels.attention import flash_attention  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
CASES = [(4, 4096, 16, 128), (16, 1024, 32, 64)] if CUDA else [(1, 48, 2, 32)]


def _sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


@pytest.fixture(params=CASES, ids=[f"b{b}-T{t}-h{h}-d{d}" for b, t, h, d in CASES])
def qkv(request):
    if not CUDA and not interpreting():
        pytest.skip("without CUDA the kernel needs TRITON_INTERPRET=1 set before triton loads")
    dtype = torch.bfloat16 if CUDA else torch.float32
    return tuple(torch.randn(request.param, device=DEVICE, dtype=dtype, requires_grad=True)
                 for _ in range(3))


def test_attention_forward(benchmark, qkv):
    q, k, v = qkv

    def run():
        out = flash_attention(q, k, v, causal=True)
        _sync()
        return out

    out = benchmark(run)
    assert out.shape == q.shape


def test_attention_forward_backward(benchmark, qkv):
    q, k, v = qkv
    grad_out = torch.randn_like(q)

    def run():
        grads = torch.autograd.grad(flash_attention(q, k, v, causal=True), (q, k, v), grad_out)
        _sync()
        return grads

    dq, dk, dv = benchmark(run)
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape
