"""LayerNorm and RMSNorm over the last dimension, with an optional fused residual add."""

from __future__ import annotations

import torch

from llm_engine import _C
from llm_engine.kernels.reference import layer_norm as norm_ref
from llm_engine.ops.common import (
    ANY,
    as_rows,
    cpp_needs,
    never,
    on_cuda,
    rowwise,
    triton_kernel,
    triton_needs,
)
from llm_engine.ops.dispatch import Op, registry, tensor_facts


def _layer_norm_signature(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                          eps: float, residual: torch.Tensor | None = None) -> tuple:
    return tensor_facts("layer_norm", x, weight, bias, residual)


def _rms_norm_signature(x: torch.Tensor, weight: torch.Tensor, eps: float,
                        residual: torch.Tensor | None = None) -> tuple:
    return (*tensor_facts("rms_norm", x, weight, residual),
            x.shape[-1:] == weight.shape and (residual is None or residual.shape == x.shape))


LAYER_NORM = registry().add(Op("layer_norm", _layer_norm_signature,
                               summary="LayerNorm (+ residual)"))
RMS_NORM = registry().add(Op("rms_norm", _rms_norm_signature, {
    "shapes": "weight (hidden,), residual like x",
}, "RMSNorm (+ residual)"))


def layer_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    eps: float,
    residual: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """LayerNorm over the last dim; with ``residual``: ``(norm(x + residual), x + residual)``.

    x: (..., hidden); weight, bias: (hidden,); residual: like x. Returns like x."""
    return LAYER_NORM.pick(x, weight, bias, eps, residual)(x, weight, bias, eps=eps,
                                                           residual=residual)


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm over the last dim; with ``residual``: ``(norm(x + residual), x + residual)``.

    x: (..., hidden); weight: (hidden,); residual: like x. Returns like x."""
    return RMS_NORM.pick(x, weight, eps, residual)(x, weight, eps=eps, residual=residual)


def _rms_norm_cpp(x: torch.Tensor, weight: torch.Tensor, eps: float,
                  residual: torch.Tensor | None = None
                  ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    x2 = as_rows(x)
    out = torch.empty_like(x2)
    threads = torch.get_num_threads()
    if residual is None:
        _C.rms_norm(out.numpy(), None, x2.numpy(), None, weight.contiguous().numpy(), eps, threads)
        return out.view(x.shape)
    res_out = torch.empty_like(x2)
    _C.rms_norm(out.numpy(), res_out.numpy(), x2.numpy(), as_rows(residual).numpy(),
                weight.contiguous().numpy(), eps, threads)
    return out.view(x.shape), res_out.view(x.shape)


LAYER_NORM.register("triton", triton_kernel("layer_norm", "layer_norm"), triton_needs(grad=True),
                    "Triton kernel, fused residual, its own backward", auto=on_cuda)
LAYER_NORM.register("reference", norm_ref.layer_norm_reference, ANY, "plain PyTorch")
RMS_NORM.register("triton", triton_kernel("layer_norm", "rms_norm"), triton_needs(grad=True),
                  "Triton kernel, fused residual, its own backward", auto=on_cuda)
RMS_NORM.register("cpp", _rms_norm_cpp, cpp_needs(("shapes",)), "C++ CPU kernel (_C.rms_norm)")
RMS_NORM.register("reference", norm_ref.rms_norm_reference, ANY, "plain PyTorch")


def _norm_rowwise(norm, x: torch.Tensor, residual: torch.Tensor | None, *params):
    flat = x.reshape(-1, x.shape[-1])
    if residual is None:
        return rowwise(lambda r: norm(r, *params), flat).view(x.shape)
    res = residual.reshape(-1, x.shape[-1])
    pairs = [norm(flat[i:i + 1].clone(), *params, residual=res[i:i + 1].clone())
             for i in range(flat.shape[0])]
    return (torch.cat([p[0] for p in pairs]).view(x.shape),
            torch.cat([p[1] for p in pairs]).view(x.shape))


def _rms_norm_rowwise(x: torch.Tensor, weight: torch.Tensor, eps: float,
                      residual: torch.Tensor | None = None):
    return _norm_rowwise(lambda r, *, residual=None: norm_ref.rms_norm_reference(
        r, weight, eps=eps, residual=residual), x, residual)


def _layer_norm_rowwise(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                        eps: float, residual: torch.Tensor | None = None):
    return _norm_rowwise(lambda r, *, residual=None: norm_ref.layer_norm_reference(
        r, weight, bias, eps=eps, residual=residual), x, residual)


LAYER_NORM.register("rowwise", _layer_norm_rowwise, ANY,
                    "plain PyTorch one row at a time: batch-invariant (only when forced)",
                    auto=never)
RMS_NORM.register("rowwise", _rms_norm_rowwise, ANY,
                  "plain PyTorch one row at a time: batch-invariant (only when forced)",
                  auto=never)
