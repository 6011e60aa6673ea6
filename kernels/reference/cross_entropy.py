"""Fused linear cross-entropy in plain PyTorch: the chunked algorithm that both versions
share (the logits of one chunk of tokens at a time, the loss and the gradients computed
in the forward; ``llm_engine.kernels.cross_entropy`` describes it), parametrised by the
per-row step, and the reference, whose row step is plain PyTorch (fp32 per chunk)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .._utils import FLOAT_DTYPES, check_tensor

# A chunk holds at most this many logits (64 MiB in bf16, 128 MiB in fp32).
_CHUNK_ELEMENTS = 1 << 25

# A row step takes (logits (c, V), targets (c,), ignore_index, scale (1,) fp32, compute_grad)
# and returns the per-row loss (c,) fp32; with compute_grad it overwrites logits with
# (softmax - onehot) * scale (zero on ignored rows).
RowStep = Callable[[torch.Tensor, torch.Tensor, int, torch.Tensor, bool], torch.Tensor]


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
