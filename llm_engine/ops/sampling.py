"""Sampling a token per row of logits, and the fused linear cross-entropy loss."""

from __future__ import annotations

import torch

from llm_engine.kernels.reference import cross_entropy as cross_entropy_ref
from llm_engine.kernels.reference import sampling as sampling_ref
from llm_engine.ops.common import ANY, on_cuda, triton_kernel, triton_needs
from llm_engine.ops.dispatch import Op, registry, tensor_facts

SAMPLE = registry().add(Op("sample", lambda logits, *a, **k: tensor_facts("sample", logits),
                           summary="temperature / top-k / top-p / min-p sampling"))
CROSS_ENTROPY = registry().add(Op(
    "cross_entropy", lambda hidden, weight, *a, **k: tensor_facts("cross_entropy", hidden, weight),
    summary="chunked linear + cross-entropy loss"))


def sample(
    logits: torch.Tensor,
    temperature: float | torch.Tensor,
    top_k: int | torch.Tensor | None = None,
    top_p: float | torch.Tensor | None = None,
    min_p: float | torch.Tensor | None = None,
    seed: int | torch.Tensor | None = None,
    step: int | torch.Tensor = 0,
    return_logprobs: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Sample one token per row of ``logits (batch, vocab)``; see ``kernels.sampling.sample``."""
    return SAMPLE.pick(logits)(logits, temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                               seed=seed, step=step, return_logprobs=return_logprobs)


def cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Mean cross-entropy of ``hidden (T, H) @ weight (V, H).T`` against ``targets (T,)``.

    Chunked over tokens so the full ``(T, V)`` fp32 logits never exist at once.
    """
    return CROSS_ENTROPY.pick(hidden, weight)(hidden, weight, targets, ignore_index=ignore_index)


SAMPLE.register("triton", triton_kernel("sampling", "sample"), triton_needs(grad=True),
                "Triton rejection sampling over pivots, no sort", auto=on_cuda)
SAMPLE.register("reference", sampling_ref.sample_reference, ANY,
                "plain PyTorch: sort, cumsum, multinomial")
CROSS_ENTROPY.register("triton", triton_kernel("cross_entropy", "fused_linear_cross_entropy"),
                       triton_needs(grad=True), "Triton row kernel, gradients in the forward",
                       auto=on_cuda)
CROSS_ENTROPY.register("reference", cross_entropy_ref.fused_linear_cross_entropy_reference,
                       ANY, "the same chunks, rows in plain PyTorch")
