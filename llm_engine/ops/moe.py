"""Mixture of experts: the top-k router and the experts' SwiGLU MLPs."""

from __future__ import annotations

import torch

from llm_engine.kernels.reference import moe as moe_ref
from llm_engine.ops.common import ANY, on_cuda, triton_kernel, triton_needs
from llm_engine.ops.dispatch import Op, registry, tensor_facts


def _moe_signature(x: torch.Tensor, up_proj: torch.Tensor, down_proj: torch.Tensor,
                   weights: torch.Tensor, experts: torch.Tensor) -> tuple:
    # weights are fp32 whatever x is, so they count for the gradient only
    op, device, dtype, grad = tensor_facts("moe", x, up_proj, down_proj)
    return op, device, dtype, grad or (torch.is_grad_enabled() and weights.requires_grad)


MOE = registry().add(Op("moe", _moe_signature, summary="mixture of SwiGLU experts"))


def moe_route(router_logits: torch.Tensor, top_k: int, normalize: bool
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``top_k`` experts per token of ``router_logits (T, experts)`` by softmax weight:
    ``(weights (T, top_k) fp32, experts (T, top_k) int64)``; ``normalize`` rescales each
    token's weights to sum to 1 (``kernels.moe.route_topk``)."""
    return moe_ref.route_topk(router_logits, top_k, normalize)


def moe(x: torch.Tensor, up_proj: torch.Tensor, down_proj: torch.Tensor, weights: torch.Tensor,
        experts: torch.Tensor) -> torch.Tensor:
    """Mixture of SwiGLU experts: ``x (T, hidden)``, ``up_proj (E, 2·width, hidden)``
    (``[gate | up]`` rows), ``down_proj (E, hidden, width)``, routing ``weights, experts
    (T, top_k)``; returns ``(T, hidden)`` in x's dtype."""
    return MOE.pick(x, up_proj, down_proj, weights, experts)(x, up_proj, down_proj, weights,
                                                              experts)


MOE.register("triton", triton_kernel("moe", "fused_moe"), triton_needs(grad=False),
             "Triton grouped GEMMs over the pairs grouped by expert, SwiGLU and routing "
             "weights fused", auto=on_cuda)
MOE.register("reference", moe_ref.moe_reference, ANY,
             "plain PyTorch, one pair of matmuls per expert with tokens")
