"""Linear layers: oneDNN on CPU (with packed weights for inference), else ``F.linear``."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llm_engine.ops import onednn
from llm_engine.ops.common import never, rowwise
from llm_engine.ops.dispatch import Needs, Op, registry, tensor_facts
from llm_engine.ops.quantized import quantized_linear
from llm_engine.quant import QuantizedWeight


class PackedWeight:
    """A linear weight in oneDNN's blocked layout, for CPU inference through :func:`linear`.

    oneDNN reorders a plain ``(out, in)`` weight on every call; a packed copy skips
    that (the ``linear`` benchmark suite measures the gain at each row count). The cost
    is a second copy of the weight, made on first use and remade whenever the weight
    changes: an in-place update bumps the weight's version, and a new tensor has another
    storage (the cache holds the old one, so its address cannot be reused). Where oneDNN
    cannot pack the weight, :meth:`get` returns it unchanged.
    """

    # Rows the packed layout is tuned for; any row count works with it.
    ROWS_HINT = 32

    def __init__(self) -> None:
        self._source: torch.Tensor | None = None
        self._version = -1
        self._packed: torch.Tensor | None = None

    def get(self, weight: torch.Tensor) -> torch.Tensor:
        """The packed copy of ``weight (out, in)``, or ``weight`` itself where oneDNN
        cannot pack it (not a float32 CPU tensor, or no oneDNN packing in this build)
        or where changes to it cannot be seen (an inference-mode tensor has no version)."""
        if (onednn.REORDER_WEIGHT is None or weight.device.type != "cpu" or weight.dtype != torch.float32
                or weight.dim() != 2 or weight.is_inference()):
            return weight
        src = self._source
        if (src is None or src.data_ptr() != weight.data_ptr() or src.shape != weight.shape
                or src.stride() != weight.stride() or weight._version != self._version):
            with torch.inference_mode(False), torch.no_grad():
                self._packed = onednn.REORDER_WEIGHT(weight.detach(), self.ROWS_HINT)
            self._source, self._version = weight.detach(), weight._version
        return self._packed

    def __getstate__(self) -> dict:
        return {"_source": None, "_version": -1, "_packed": None}  # a copy packs anew


class _OneDNNLinear(torch.autograd.Function):
    """The CPU linear with its backward also through oneDNN:
    ``dx = dy @ W`` and ``dW = dy.T @ x`` are the same op on transposed views."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return onednn.mm(x, weight, bias)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, weight = ctx.saved_tensors
        dy2, x2 = dy.reshape(-1, dy.shape[-1]), x.reshape(-1, x.shape[-1])
        dx = onednn.mm(dy, weight.t(), None) if ctx.needs_input_grad[0] else None
        dw = onednn.mm(dy2.t(), x2.t(), None) if ctx.needs_input_grad[1] else None
        db = dy2.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return dx, dw, db


def _signature(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
               packed: PackedWeight | None = None) -> tuple:
    return (*tensor_facts("linear", x, weight, bias),
            weight.dim() == 2 and x.dim() >= 2 and x.numel() > 0, onednn.usable())


LINEAR = registry().add(Op("linear", _signature, {
    "matrix": "x (..., in) with 2+ dims and rows, weight (out, in)",
    "onednn": "oneDNN enabled, no CPU autocast",
}, "x @ weight.T + bias"))


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           packed: PackedWeight | None = None) -> torch.Tensor:
    """``x (..., in) @ weight (out, in).T + bias (out,)``, in ``x``'s dtype.

    On CPU (fp32 or bf16) the matmuls go through oneDNN rather than PyTorch's
    default CPU GEMM (MKL), forward and backward (``llm-engine bench linear`` compares
    them); elsewhere ``F.linear`` (cuBLAS on CUDA).

    ``packed``: the weight's :class:`PackedWeight` cache, used when no gradient is
    needed (inference), where oneDNN applies. A :class:`~llm_engine.quant.QuantizedWeight`
    goes to :func:`llm_engine.ops.quantized_linear`.
    """
    if isinstance(weight, QuantizedWeight):
        return quantized_linear(x, weight, bias)
    return LINEAR.pick(x, weight, bias, packed)(x, weight, bias, packed)


def _linear_onednn(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                   packed: PackedWeight | None = None) -> torch.Tensor:
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias)):
        return _OneDNNLinear.apply(x, weight, bias)
    if packed is not None:
        weight = packed.get(weight)
    return onednn.mm_bucketed(x, weight, bias)


def _linear_torch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  packed: PackedWeight | None = None) -> torch.Tensor:
    return F.linear(x, weight, bias)


LINEAR.register("onednn", _linear_onednn,
                Needs(devices=("cpu",), dtypes=onednn.ONEDNN_DTYPES,
                      facts=("matrix", "onednn")),
                "oneDNN matmul (packed weights in inference), its own backward")
LINEAR.register("reference", _linear_torch, Needs(), "F.linear (MKL on CPU, cuBLAS on CUDA)")


def _linear_rowwise(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                    packed: PackedWeight | None = None) -> torch.Tensor:
    """One ``F.linear`` per row of ``x`` on the weight itself (never the packed copy)."""
    flat = x.reshape(-1, x.shape[-1])
    out = rowwise(lambda r: F.linear(r, weight, bias), flat)
    return out.view(*x.shape[:-1], weight.shape[0])


LINEAR.register("rowwise", _linear_rowwise, Needs(),
                "F.linear one row at a time: batch-invariant (only when forced)", auto=never)
