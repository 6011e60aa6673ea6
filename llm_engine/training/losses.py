"""Losses of preference learning: Bradley–Terry (reward model), DPO / IPO, and GRPO's
group advantages, clipped policy objective and KL estimator, plus per-token log-probs.

Every function takes and returns fp32 tensors; shapes are in the docstrings.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from llm_engine import ops
from llm_engine.model import AttentionMetadata
from llm_engine.training.data import IGNORE_INDEX

LOGPROB_CHUNK = 1024  # tokens whose (chunk, vocab) logits exist at once


def _chunk_logprobs(hidden: torch.Tensor, weight: torch.Tensor,
                    targets: torch.Tensor) -> torch.Tensor:
    logits = ops.linear(hidden, weight).float()
    logp = torch.log_softmax(logits, dim=-1)
    picked = logp.gather(1, targets.clamp(min=0).unsqueeze(1)).squeeze(1)
    return torch.where(targets == IGNORE_INDEX, torch.zeros_like(picked), picked)


def token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                   chunk: int = LOGPROB_CHUNK) -> torch.Tensor:
    """``log softmax(hidden @ weight.T)[t, targets[t]]`` for ``hidden (T, H)``, ``weight
    (V, H)``, ``targets (T,)`` int64; 0 where the target is ``IGNORE_INDEX``. Returns
    ``(T,)`` fp32.

    Chunked over tokens and recomputed in the backward pass, so at most ``chunk`` rows of
    fp32 logits exist at once. The log-softmax is the engine sampler's formula, so the
    two agree wherever the logits do.
    """
    if weight.dtype != hidden.dtype:
        weight = weight.to(hidden.dtype)
    parts = []
    for start in range(0, hidden.shape[0], chunk):
        args = (hidden[start:start + chunk], weight, targets[start:start + chunk])
        if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
            parts.append(checkpoint(_chunk_logprobs, *args, use_reentrant=False))
        else:
            parts.append(_chunk_logprobs(*args))
    return torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)


def _target_logprobs(hidden: torch.Tensor, weight: torch.Tensor,
                     targets: torch.Tensor) -> torch.Tensor:
    """:func:`token_logprobs` of ``hidden (B*S, H)`` for ``targets (B, S)``, the LM head
    run on the scored rows only (the answer tokens, not the prompt or the padding);
    ``(B, S)`` fp32, 0 elsewhere."""
    flat = targets.reshape(-1)
    keep = (flat != IGNORE_INDEX).nonzero().squeeze(1)
    picked = token_logprobs(hidden.index_select(0, keep), weight, flat.index_select(0, keep))
    out = picked.new_zeros(flat.shape[0]).index_put((keep,), picked)
    return out.view(targets.shape)


def sequence_logprobs(model: torch.nn.Module, inputs: torch.Tensor,
                      targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs ``(B, S)`` of ``targets`` under ``model`` (a ``Transformer``)
    for right-padded ``inputs, targets: (B, S)`` int64 (0 where the target is
    ``IGNORE_INDEX``), and the response mask ``(B, S)`` bool (targets not ``IGNORE_INDEX``)."""
    hidden = model.forward_batch(inputs)
    return _target_logprobs(hidden, model.lm_head_weight, targets), targets != IGNORE_INDEX


def shared_bottom(policy: torch.nn.Module, reference: torch.nn.Module) -> int:
    """How many leading blocks ``reference`` runs with the very same frozen weights as
    ``policy`` (both ``Transformer``), their embeddings shared and frozen too: 0 when
    the embeddings are not shared."""
    def same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
        pa, pb = list(a.parameters()), list(b.parameters())
        return (len(pa) == len(pb)
                and all(x is y and not x.requires_grad for x, y in zip(pa, pb, strict=True)))

    embeds = [(policy.embed_tokens, reference.embed_tokens)]
    if policy.embed_positions is not None:
        embeds.append((policy.embed_positions, reference.embed_positions))
    if not all(same(a, b) for a, b in embeds):
        return 0
    count = 0
    for a, b in zip(policy.layers, reference.layers, strict=True):
        if not same(a, b):
            break
        count += 1
    return count


def policy_and_reference_logprobs(policy: torch.nn.Module, reference: torch.nn.Module,
                                  inputs: torch.Tensor, targets: torch.Tensor, shared: int
                                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`sequence_logprobs` of ``policy`` (with its gradient) and of ``reference``
    (without), the first ``shared`` blocks (:func:`shared_bottom`) run once for both.

    The same ops in the same order as ``Transformer.forward_batch``, so each result
    equals :func:`sequence_logprobs` bit for bit. Returns ``(policy (B, S), reference
    (B, S), mask (B, S))``.
    """
    B, S = inputs.shape
    ids = inputs.reshape(-1)
    positions = torch.arange(S, device=inputs.device).repeat(B)
    attn = AttentionMetadata.for_batch(B, S, inputs.device)
    rope = policy.rope_tables(inputs.device)
    if rope is not None:
        rope = ops.rope_at(positions, *rope)
    with torch.no_grad():
        x = policy.embed_tokens(ids)
        if policy.embed_positions is not None:
            x = x + policy.embed_positions(positions)
        residual = None
        for layer in policy.layers[:shared]:
            x, residual = layer(x, residual, attn, rope, None)

    def top(model: torch.nn.Module) -> torch.Tensor:
        h, r = x, residual
        for layer in model.layers[shared:]:
            if model.gradient_checkpointing and model.training:
                h, r = checkpoint(layer, h, r, attn, rope, None, use_reentrant=False)
            else:
                h, r = layer(h, r, attn, rope, None)
        h, _ = model.norm(h, r)
        return _target_logprobs(h, model.lm_head_weight, targets)

    with torch.no_grad():
        ref = top(reference)
    return top(policy), ref, targets != IGNORE_INDEX


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reward-model loss ``mean(−log σ(r_c − r_r))`` for rewards ``(N,)``; also returns the
    pair accuracy (fraction with ``r_c > r_r``) and the mean margin ``r_c − r_r``."""
    diff = chosen.float() - rejected.float()
    return -F.logsigmoid(diff).mean(), (diff > 0).float().mean(), diff.mean()


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
             ref_chosen: torch.Tensor, ref_rejected: torch.Tensor, beta: float,
             ipo: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPO (Rafailov et al. 2023) or IPO (Azar et al. 2023) loss of sequence log-probs
    ``(N,)`` (summed over each answer's tokens).

    With ``h = (π_c − ref_c) − (π_r − ref_r)``: DPO is ``mean(−log σ(β·h))``, IPO is
    ``mean((h − 1/(2β))²)``. Also returns the preference accuracy (fraction with
    ``h > 0``) and the mean implicit reward margin ``β·h``.
    """
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    h = (policy_chosen.float() - ref_chosen.float()) - (policy_rejected.float() - ref_rejected.float())
    loss = ((h - 1.0 / (2.0 * beta)) ** 2).mean() if ipo else -F.logsigmoid(beta * h).mean()
    return loss, (h > 0).float().mean(), (beta * h).mean()


def group_advantages(rewards: torch.Tensor, scale: bool = True, eps: float = 1e-4
                     ) -> torch.Tensor:
    """GRPO advantages of ``rewards (prompts, n)``: each reward minus its group's mean,
    divided by the group's standard deviation (unbiased) + ``eps`` when ``scale``. A group
    whose rewards are all equal gets zeros."""
    if rewards.dim() != 2 or rewards.shape[1] < 2:
        raise ValueError(f"rewards must be (prompts, n) with n >= 2, got {tuple(rewards.shape)}")
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    if scale:
        centred = centred / (rewards.std(dim=1, keepdim=True) + eps)
    return centred


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token estimate of KL(π ‖ π_ref) from samples of π (Schulman's k3):
    ``exp(ref − logp) − (ref − logp) − 1`` ≥ 0, unbiased, same shape as the inputs."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1.0


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor,
              advantages: torch.Tensor, mask: torch.Tensor, clip_eps: float, kl_coef: float
              ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The clipped GRPO objective over response tokens.

    ``logp`` (with grad), ``old_logp`` (the sampling policy's), ``ref_logp`` (the frozen
    reference's): ``(B, S)`` fp32; ``advantages: (B,)``; ``mask: (B, S)`` bool. Per token:
    ``−min(ρ·A, clip(ρ, 1−ε, 1+ε)·A) + kl_coef·k3`` with ``ρ = exp(logp − old_logp)``,
    averaged over each sequence's tokens, then over sequences. Returns the loss and
    ``{"kl", "clip_frac"}`` (token means, detached; ``clip_frac``: tokens where the clipped
    term is the smaller, so their gradient is cut).
    """
    m = mask.float()
    counts = m.sum(dim=1).clamp(min=1)
    ratio = torch.exp(logp - old_logp)
    adv = advantages.unsqueeze(1)
    unclipped, clipped = ratio * adv, ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv
    kl = kl_estimate(logp, ref_logp)
    per_token = -torch.minimum(unclipped, clipped) + kl_coef * kl
    loss = ((per_token * m).sum(dim=1) / counts).mean()
    total = m.sum().clamp(min=1)
    stats = {"kl": ((kl * m).sum() / total).detach(),
             "clip_frac": (((clipped < unclipped).float() * m).sum() / total).detach()}
    return loss, stats
