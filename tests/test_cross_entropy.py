"""Fused linear cross-entropy: Triton row kernel and chunked reference against F.cross_entropy."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from llm_engine.kernels.cross_entropy import (
    fused_linear_cross_entropy,
    fused_linear_cross_entropy_reference,
)
from testing_utils import assert_close, interpreter_or_cuda

DEVICE = interpreter_or_cuda()
IMPLS = {"triton": fused_linear_cross_entropy, "reference": fused_linear_cross_entropy_reference}


def _inputs(n_tokens: int, hidden_size: int, vocab: int, dtype: torch.dtype, n_ignored: int = 0,
            device: str = DEVICE):
    hidden = (torch.randn(n_tokens, hidden_size, dtype=torch.float32) * 0.5).to(device, dtype)
    weight = (torch.randn(vocab, hidden_size, dtype=torch.float32) * 0.5).to(device, dtype)
    targets = torch.randint(0, vocab, (n_tokens,))
    targets[torch.randperm(n_tokens)[:n_ignored]] = -100
    return hidden.requires_grad_(), weight.requires_grad_(), targets.to(device)


def _plain(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
           reduction: str = "mean"):
    """Loss and grads of F.cross_entropy on the full fp32 logits (the spec)."""
    h = hidden.detach().double().requires_grad_()
    w = weight.detach().double().requires_grad_()
    loss = F.cross_entropy(h @ w.T, targets, ignore_index=-100, reduction=reduction)
    loss.backward()
    return loss.detach(), h.grad, w.grad


def _fused(impl, hidden, weight, targets, **kw):
    loss = impl(hidden, weight, targets, **kw)
    loss.backward()
    return loss.detach(), hidden.grad, weight.grad


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("n_tokens,hidden_size,vocab,n_ignored", [
    (37, 32, 1000, 5),    # odd token count, vocab not a multiple of the block
    (1, 16, 517, 0),      # a single token
    (24, 48, 2113, 24),   # every token ignored: loss and grads are zero
])
def test_matches_plain_cross_entropy_loss_and_grads(impl, dtype, n_tokens, hidden_size, vocab,
                                                    n_ignored):
    hidden, weight, targets = _inputs(n_tokens, hidden_size, vocab, dtype, n_ignored)
    loss, gh, gw = _fused(IMPLS[impl], hidden, weight, targets, chunk_size=16)
    if n_ignored == n_tokens:
        assert loss.item() == 0.0
        assert not gh.any() and not gw.any()
        return
    ref_loss, ref_gh, ref_gw = _plain(hidden, weight, targets)
    assert loss.dtype == torch.float32
    assert_close(loss.reshape(1), ref_loss.reshape(1), dtype, what="loss")
    assert gh.dtype == dtype and gw.dtype == dtype
    assert_close(gh, ref_gh, dtype, grad=True, what="grad hidden")
    assert_close(gw, ref_gw, dtype, grad=True, what="grad weight")


@pytest.mark.parametrize("impl", IMPLS)
def test_sum_reduction_and_grad_output_scaling(impl):
    hidden, weight, targets = _inputs(20, 16, 300, torch.float32, n_ignored=3)
    loss = IMPLS[impl](hidden, weight, targets, reduction="sum", chunk_size=7)
    (loss * 2.5).backward()
    ref_loss, ref_gh, ref_gw = _plain(hidden, weight, targets, reduction="sum")
    assert_close(loss.detach().reshape(1), ref_loss.reshape(1), torch.float32, what="loss")
    assert_close(hidden.grad, ref_gh * 2.5, torch.float32, grad=True, what="grad hidden")
    assert_close(weight.grad, ref_gw * 2.5, torch.float32, grad=True, what="grad weight")


@pytest.mark.parametrize("chunk_size", [1, 5, 64])
def test_chunk_size_does_not_change_the_result(chunk_size):
    hidden, weight, targets = _inputs(19, 16, 257, torch.float32, n_ignored=4)
    loss, gh, gw = _fused(fused_linear_cross_entropy, hidden, weight, targets,
                          chunk_size=chunk_size)
    ref_loss, ref_gh, ref_gw = _plain(hidden, weight, targets)
    assert_close(loss.reshape(1), ref_loss.reshape(1), torch.float32, what="loss")
    assert_close(gh, ref_gh, torch.float32, grad=True, what="grad hidden")
    assert_close(gw, ref_gw, torch.float32, grad=True, what="grad weight")


def test_no_grad_computes_only_the_loss():
    hidden, weight, targets = _inputs(9, 16, 300, torch.float32)
    with torch.no_grad():
        loss = fused_linear_cross_entropy(hidden, weight, targets)
    assert not loss.requires_grad
    ref_loss, _, _ = _plain(hidden, weight, targets)
    assert_close(loss.reshape(1), ref_loss.reshape(1), torch.float32, what="loss")


def test_reference_runs_on_cpu_without_the_interpreter():
    hidden, weight, targets = _inputs(11, 8, 100, torch.float32, n_ignored=2, device="cpu")
    loss, gh, gw = _fused(fused_linear_cross_entropy_reference, hidden, weight, targets,
                          chunk_size=4)
    ref_loss, ref_gh, ref_gw = _plain(hidden, weight, targets)
    assert_close(loss.reshape(1), ref_loss.reshape(1), torch.float32, what="loss")
    assert_close(gh, ref_gh, torch.float32, grad=True, what="grad hidden")
    assert_close(gw, ref_gw, torch.float32, grad=True, what="grad weight")


@pytest.mark.parametrize("impl", IMPLS)
def test_rejects_bad_inputs_naming_the_argument(impl):
    fn = IMPLS[impl]
    h = torch.randn(4, 8, device=DEVICE)
    w = torch.randn(10, 8, device=DEVICE)
    t = torch.zeros(4, dtype=torch.long, device=DEVICE)
    with pytest.raises(ValueError, match="weight must have shape"):
        fn(h, torch.randn(10, 7, device=DEVICE), t)
    with pytest.raises(ValueError, match="targets must have shape"):
        fn(h, w, t[:3])
    with pytest.raises(ValueError, match="weight must have dtype"):
        fn(h, w.half(), t)
    with pytest.raises(ValueError, match="targets must be in"):
        fn(h, w, torch.tensor([0, 1, 10, 2], device=DEVICE))
    with pytest.raises(ValueError, match="reduction"):
        fn(h, w, t, reduction="none")
    with pytest.raises(TypeError, match="hidden must be a torch.Tensor"):
        fn(h.tolist(), w, t)


@pytest.mark.gpu
@pytest.mark.parametrize("n_tokens,hidden_size,vocab", [(4096, 768, 50257), (2048, 576, 49152)])
def test_bf16_matches_plain_cross_entropy_on_gpu(n_tokens, hidden_size, vocab):
    hidden, weight, targets = _inputs(n_tokens, hidden_size, vocab, torch.bfloat16, n_ignored=100,
                                      device="cuda")
    loss, gh, gw = _fused(fused_linear_cross_entropy, hidden, weight, targets)
    ref_loss, ref_gh, ref_gw = _plain(hidden, weight, targets)
    assert_close(loss.reshape(1), ref_loss.reshape(1), torch.bfloat16, what="loss")
    assert_close(gh, ref_gh, torch.bfloat16, grad=True, what="grad hidden")
    assert_close(gw, ref_gw, torch.bfloat16, grad=True, what="grad weight")


@pytest.mark.gpu
def test_peak_memory_stays_below_the_full_fp32_logits():
    n_tokens, hidden_size, vocab = 8192, 768, 50257
    hidden, weight, targets = _inputs(n_tokens, hidden_size, vocab, torch.bfloat16,
                                      device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fused_linear_cross_entropy(hidden, weight, targets).backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra < n_tokens * vocab * 4 / 2, f"peak extra memory {extra / 2**20:.0f} MiB"
