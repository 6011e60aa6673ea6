"""LayerNorm and RMSNorm in plain PyTorch (fp32 math): the references of the Triton
kernels of ``llm_engine.kernels.layer_norm``, with the same arguments and return
convention (an optional fused residual add returns ``(norm(h), h)``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _residual_sum(x: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
    if residual is None:
        return x
    return (x.float() + residual.float()).to(x.dtype)


def layer_norm_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    residual: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Plain-PyTorch ``layer_norm``: same arguments and return convention, math in fp32."""
    h = _residual_sum(x, residual)
    hf = h.float()
    mean = hf.mean(dim=-1, keepdim=True)
    var = (hf - mean).square().mean(dim=-1, keepdim=True)
    y = (hf - mean) * torch.rsqrt(var + eps) * weight.float()
    if bias is not None:
        y = y + bias.float()
    y = y.to(x.dtype)
    return y if residual is None else (y, h)


def rms_norm_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float = 1e-6,
    residual: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Plain-PyTorch ``rms_norm``: same arguments and return convention, math in fp32."""
    h = _residual_sum(x, residual)
    hf = h.float()
    y = F.rms_norm(hf, hf.shape[-1:], weight.float(), eps).to(x.dtype)
    return y if residual is None else (y, h)
