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

from collections.abc import Callable

import torch
import triton
import triton.language as tl

from ._utils import (
    FLOAT_DTYPES,
    check_last_dim_contiguous,
    check_tensor,
    check_triton_device,
    interpreting,
    tuning_choices,
)

# A chunk holds at most this many logits (64 MiB in bf16, 128 MiB in fp32).
_CHUNK_ELEMENTS = 1 << 25

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


# A row step takes (logits (c, V), targets (c,), ignore_index, scale (1,) fp32, compute_grad)
# and returns the per-row loss (c,) fp32; with compute_grad it overwrites logits with
# (softmax - onehot) * scale (zero on ignored rows).
RowStep = Callable[[torch.Tensor, torch.Tensor, int, torch.Tensor, bool], torch.Tensor]


def _rows_triton(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int,
                 scale: torch.Tensor, compute_grad: bool) -> torch.Tensor:
    n_rows, n_cols = logits.shape
    loss = torch.empty(n_rows, device=logits.device, dtype=torch.float32)
    _ce_rows_kernel[(n_rows,)](
        logits, logits.stride(0), targets, loss, scale, n_cols, ignore_index,
        COMPUTE_GRAD=compute_grad,
    )
    return loss


def _rows_torch(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int,
                scale: torch.Tensor, compute_grad: bool) -> torch.Tensor:
    x = logits.float()  # an fp32 copy of fp16/bf16 logits; the logits themselves if fp32
    valid = targets != ignore_index
    safe_targets = torch.where(valid, targets, 0)
    lse = torch.logsumexp(x, dim=-1)
    loss = (lse - x.gather(1, safe_targets[:, None]).squeeze(1)) * valid
    if compute_grad:
        x.sub_(lse[:, None]).exp_()
        x.scatter_add_(1, safe_targets[:, None], -torch.ones_like(x[:, :1]))
        x.mul_((scale * valid)[:, None])
        if x is not logits:
            logits.copy_(x)
    return loss


def _check_inputs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                  reduction: str) -> None:
    check_tensor("hidden", hidden, dtypes=FLOAT_DTYPES, ndim=2)
    check_tensor("weight", weight, dtypes=(hidden.dtype,), ndim=2, device=hidden.device)
    check_tensor("targets", targets, dtypes=(torch.int64, torch.int32), ndim=1,
                 device=hidden.device)
    if weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"weight must have shape (vocab, {hidden.shape[1]}) to match hidden "
                         f"{tuple(hidden.shape)}, got {tuple(weight.shape)}")
    if targets.shape[0] != hidden.shape[0]:
        raise ValueError(f"targets must have shape ({hidden.shape[0]},) to match hidden "
                         f"{tuple(hidden.shape)}, got {tuple(targets.shape)}")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")


def _default_chunk_size(n_tokens: int, vocab: int) -> int:
    chunk = max(1, _CHUNK_ELEMENTS // vocab)
    if chunk >= 256:
        chunk -= chunk % 128  # matmul-friendly row counts
    return min(n_tokens, chunk)


def _run(row_step: RowStep, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
         ignore_index: int, reduction: str, chunk_size: int | None, compute_grad: bool
         ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Chunked loss (fp32 scalar) and, with ``compute_grad``, grads w.r.t. hidden and weight."""
    n_tokens, vocab = hidden.shape[0], weight.shape[0]
    targets = targets.long()
    valid = targets != ignore_index
    bad = valid & ((targets < 0) | (targets >= vocab))
    if bool(bad.any()):
        raise ValueError(f"targets must be in [0, {vocab}) or equal ignore_index={ignore_index}, "
                         f"got {targets[bad][:4].tolist()}")
    n_valid = valid.sum()
    if reduction == "mean":
        scale = (1.0 / n_valid.clamp(min=1).float()).reshape(1)
    else:
        scale = torch.ones(1, device=hidden.device, dtype=torch.float32)
    chunk = chunk_size or _default_chunk_size(n_tokens, vocab)
    with torch.autocast(hidden.device.type, enabled=False):
        return _chunks(row_step, hidden, weight, targets, ignore_index, scale, chunk,
                       compute_grad)


def _chunks(row_step: RowStep, hidden: torch.Tensor, weight: torch.Tensor,
            targets: torch.Tensor, ignore_index: int, scale: torch.Tensor, chunk: int,
            compute_grad: bool
            ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    n_tokens = hidden.shape[0]
    loss_sum = torch.zeros((), device=hidden.device, dtype=torch.float32)
    grad_hidden = torch.empty_like(hidden) if compute_grad else None
    grad_weight = (torch.zeros(weight.shape, device=weight.device, dtype=torch.float32)
                   if compute_grad else None)
    for start in range(0, n_tokens, chunk):
        h = hidden[start:start + chunk]
        logits = h @ weight.T
        loss_sum += row_step(logits, targets[start:start + chunk], ignore_index, scale,
                             compute_grad).sum()
        if compute_grad:
            torch.mm(logits, weight, out=grad_hidden[start:start + chunk])
            if weight.dtype == torch.float32:
                grad_weight.addmm_(logits.T, h)
            else:
                grad_weight += logits.T @ h
    loss = loss_sum * scale[0]
    if compute_grad:
        grad_weight = grad_weight.to(weight.dtype)
    return loss, grad_hidden, grad_weight


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                ignore_index: int, reduction: str, chunk_size: int | None,
                row_step: RowStep) -> torch.Tensor:
        loss, grad_hidden, grad_weight = _run(row_step, hidden, weight, targets, ignore_index,
                                              reduction, chunk_size, compute_grad=True)
        ctx.save_for_backward(grad_hidden, grad_weight)
        return loss

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        g = grad_output.float()
        grad_hidden = (grad_hidden * g).to(grad_hidden.dtype) if ctx.needs_input_grad[0] else None
        grad_weight = (grad_weight * g).to(grad_weight.dtype) if ctx.needs_input_grad[1] else None
        return grad_hidden, grad_weight, None, None, None, None, None


def _apply(row_step: RowStep, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
           ignore_index: int, reduction: str, chunk_size: int | None) -> torch.Tensor:
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _FusedLinearCrossEntropy.apply(hidden, weight, targets, ignore_index, reduction,
                                              chunk_size, row_step)
    loss, _, _ = _run(row_step, hidden, weight, targets, ignore_index, reduction, chunk_size,
                      compute_grad=False)
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


def fused_linear_cross_entropy_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
    *,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """The same chunked algorithm with the per-row step in plain PyTorch (fp32 per chunk).

    Same arguments and result as ``fused_linear_cross_entropy``; runs on any device. Only
    one chunk's logits (and its fp32 copy) exist at a time.
    """
    _check_inputs(hidden, weight, targets, reduction)
    return _apply(_rows_torch, hidden, weight, targets, ignore_index, reduction, chunk_size)
