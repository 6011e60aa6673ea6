"""Fused linear cross-entropy: ``loss = CE(hidden @ weight.T, targets)`` without the full logits.

A language model's loss needs the ``(tokens, vocab)`` logits; in fp32 for a
GPT-2 batch of 8×1024 tokens that is 1.6 GB before its gradient. Here the
tokens are processed in chunks: for each chunk the logits are computed (a
plain matmul in the input dtype), a Triton kernel walks each row once with an
online max / sum-exp to get the log-sum-exp, writes the row's loss and then
overwrites the logits in place with their gradient ``(softmax − onehot) · scale``,
and the chunk's gradients w.r.t. ``hidden`` and ``weight`` are accumulated
right away. The forward therefore does all the work; the backward only scales
the stored gradients by ``grad_output``. At most one chunk of logits exists
at a time.

``fused_linear_cross_entropy`` runs the Triton row kernel;
``fused_linear_cross_entropy_reference`` is the same chunked algorithm with the
row step in plain PyTorch (fp32 per chunk), used on CPU by ``llm_engine.ops``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import check_last_dim_contiguous, check_triton_device, interpreting, tuning_choices
from .reference.cross_entropy import _apply, _check_inputs, fused_linear_cross_entropy_reference

__all__ = ["fused_linear_cross_entropy", "fused_linear_cross_entropy_reference"]


def _row_configs() -> list[triton.Config]:
    if interpreting():
        return [triton.Config({"BLOCK_V": 256}, num_warps=4)]
    return [
        triton.Config({"BLOCK_V": block}, num_warps=warps)
        for block in (2048, 4096, 8192)
        for warps in (8, 16)
    ]


def _prune_rows(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Every block, or 4096-wide blocks over 8 warps under ``LLM_ENGINE_AUTOTUNE=quick``."""
    return tuning_choices(configs, lambda c: c.kwargs["BLOCK_V"] == 4096 and c.num_warps == 8)


@triton.autotune(configs=_row_configs(), key=["n_cols"], restore_value=["logits_ptr"],
                 prune_configs_by={"early_config_prune": _prune_rows})
@triton.jit
def _ce_rows_kernel(
    logits_ptr,
    stride_row,
    targets_ptr,
    loss_ptr,
    scale_ptr,
    n_cols,
    ignore_index,
    COMPUTE_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """One program per row: loss = lse − x[target]; logits ← (softmax − onehot)·scale."""
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    target = tl.load(targets_ptr + row)
    cols = tl.arange(0, BLOCK_V)
    if target == ignore_index:
        tl.store(loss_ptr + row, 0.0)
        if COMPUTE_GRAD:
            zeros = tl.zeros([BLOCK_V], dtype=logits_ptr.dtype.element_ty)
            for start in range(0, n_cols, BLOCK_V):
                tl.store(row_ptr + start + cols, zeros, mask=start + cols < n_cols)
    else:
        # Pass 1: running max m and running sum d of exp(x - m), in base 2.
        m = -float("inf")
        d = 0.0
        for start in range(0, n_cols, BLOCK_V):
            mask = start + cols < n_cols
            x = tl.load(row_ptr + start + cols, mask=mask, other=-float("inf")).to(tl.float32)
            x = x * 1.4426950408889634
            m_new = tl.maximum(m, tl.max(x, axis=0))
            d = d * tl.exp2(m - m_new) + tl.sum(tl.exp2(x - m_new), axis=0)
            m = m_new
        lse2 = m + tl.log2(d)  # log-sum-exp in base 2
        x_target = tl.load(row_ptr + target).to(tl.float32)
        tl.store(loss_ptr + row, (lse2 - x_target * 1.4426950408889634) * 0.6931471805599453)
        if COMPUTE_GRAD:
            scale = tl.load(scale_ptr)
            # Pass 2: gradient of the (scaled) loss w.r.t. the logits, written in place.
            for start in range(0, n_cols, BLOCK_V):
                offs = start + cols
                mask = offs < n_cols
                x = tl.load(row_ptr + offs, mask=mask, other=0.0).to(tl.float32)
                p = tl.exp2(x * 1.4426950408889634 - lse2)
                g = (p - tl.where(offs == target, 1.0, 0.0)) * scale
                tl.store(row_ptr + offs, g.to(logits_ptr.dtype.element_ty), mask=mask)


def _rows_triton(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int,
                 scale: torch.Tensor, compute_grad: bool) -> torch.Tensor:
    n_rows, n_cols = logits.shape
    loss = torch.empty(n_rows, device=logits.device, dtype=torch.float32)
    _ce_rows_kernel[(n_rows,)](
        logits, logits.stride(0), targets, loss, scale, n_cols, ignore_index,
        COMPUTE_GRAD=compute_grad,
    )
    return loss


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
    *,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Cross-entropy of ``hidden @ weight.T`` against ``targets``, chunked, Triton row kernel.

    hidden: (tokens, hidden_size) fp16/bf16/fp32, last dim contiguous
    weight: (vocab, hidden_size), same dtype and device (the LM head / tied embedding)
    targets: (tokens,) int64/int32 in [0, vocab) or ``ignore_index`` (those rows count nothing)
    reduction: ``"mean"`` over the non-ignored tokens (0 when all are ignored) or ``"sum"``
    chunk_size: tokens per chunk; default keeps a chunk's logits under 32M elements
    Returns the loss, an fp32 scalar. Differentiable w.r.t. ``hidden`` and ``weight``; the
    gradients are computed during the forward, so calling it with grad enabled costs the
    backward's matmuls up front (with grad disabled only the loss is computed).
    """
    _check_inputs(hidden, weight, targets, reduction)
    for name, t in (("hidden", hidden), ("weight", weight), ("targets", targets)):
        check_triton_device(name, t)
    check_last_dim_contiguous("hidden", hidden)
    check_last_dim_contiguous("weight", weight)
    return _apply(_rows_triton, hidden, weight, targets.contiguous(), ignore_index, reduction,
                  chunk_size)
