"""Mixture of SwiGLU experts in plain PyTorch: top-k routing, the input checks shared
with the Triton kernel of ``llm_engine.kernels.moe``, and its reference."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._utils import check_tensor

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def route_topk(router_logits: torch.Tensor, top_k: int, normalize: bool
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``top_k`` experts of each token by softmax probability.

    ``router_logits: (T, E)`` any float dtype. Returns ``weights: (T, top_k)`` fp32 (the
    softmax probabilities of the chosen experts, rescaled to sum to 1 when
    ``normalize``: Mixtral, Qwen3-MoE with ``norm_topk_prob``) and ``experts: (T, top_k)``
    int64, in descending weight order.
    """
    check_tensor("router_logits", router_logits, dtypes=_DTYPES, ndim=2)
    num_experts = router_logits.shape[1]
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 0 < top_k <= num_experts:
        raise ValueError(f"top_k must be an int in [1, experts={num_experts}], got {top_k!r}")
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, experts = torch.topk(probs, top_k, dim=-1)
    if normalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, experts


def _check_moe(x, up_proj, down_proj, weights, experts) -> tuple[int, int, int, int]:
    check_tensor("x", x, dtypes=(*_DTYPES, torch.float64), ndim=2)
    check_tensor("up_proj", up_proj, dtypes=(x.dtype,), ndim=3, device=x.device)
    check_tensor("down_proj", down_proj, dtypes=(x.dtype,), ndim=3, device=x.device)
    check_tensor("weights", weights, dtypes=(*_DTYPES, torch.float64), ndim=2, device=x.device)
    check_tensor("experts", experts, dtypes=(torch.int32, torch.int64), ndim=2, device=x.device)
    tokens, hidden = x.shape
    num_experts, two_width, up_hidden = up_proj.shape
    width = two_width // 2
    if up_hidden != hidden or two_width % 2:
        raise ValueError(f"up_proj must be (experts, 2*width, hidden={hidden}), "
                         f"got {tuple(up_proj.shape)}")
    if tuple(down_proj.shape) != (num_experts, hidden, width):
        raise ValueError(f"down_proj must be (experts={num_experts}, hidden={hidden}, "
                         f"width={width}), got {tuple(down_proj.shape)}")
    if weights.shape != experts.shape or weights.shape[0] != tokens:
        raise ValueError(f"weights and experts must both be (tokens={tokens}, top_k), got "
                         f"{tuple(weights.shape)} and {tuple(experts.shape)}")
    if experts.numel() and (int(experts.min()) < 0 or int(experts.max()) >= num_experts):
        raise ValueError(f"experts must hold ids in [0, {num_experts}), got "
                         f"[{int(experts.min())}, {int(experts.max())}]")
    return tokens, hidden, width, num_experts


def moe_reference(x: torch.Tensor, up_proj: torch.Tensor, down_proj: torch.Tensor,
                  weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    """Plain-PyTorch mixture of SwiGLU experts: one loop over the experts with tokens.

    ``x: (T, hidden)``; ``up_proj: (E, 2·width, hidden)`` (each expert's gate rows then
    its up rows); ``down_proj: (E, hidden, width)``; ``weights: (T, top_k)`` routing
    weights, ``experts: (T, top_k)`` int expert ids. Computes in x's dtype with fp32
    accumulation of the weighted sum; returns ``(T, hidden)`` in x's dtype.
    """
    tokens, hidden, width, num_experts = _check_moe(x, up_proj, down_proj, weights, experts)
    out = torch.zeros(tokens, hidden, dtype=torch.float32, device=x.device)
    top_k = experts.shape[1]
    flat = experts.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts).tolist()
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        pairs = order[start:start + n]
        start += n
        rows = pairs // top_k
        h = F.linear(x.index_select(0, rows), up_proj[e])
        h = F.silu(h[:, :width]) * h[:, width:]
        y = F.linear(h, down_proj[e]).float() * weights.reshape(-1)[pairs].float()[:, None]
        out.index_add_(0, rows, y)
    return out.to(x.dtype)
