"""Linear layers on quantized weights (:class:`~llm_engine.quant.QuantizedWeight`).

Implementations of ``quantized_linear``, in preference order:

- ``onednn``: CPU fp32 inference with at least :data:`QUANT_GEMM_MIN_ROWS` rows (a
  prefill): the weight dequantized tile by tile (at most ``_QUANT_TILE`` floats) into a
  scratch buffer by ``_C.quant_dequantize``, then oneDNN's fp32 GEMM;
- ``cpp``: CPU fp32 inference: ``_C.quant_matmul`` reads the blocks directly (in either
  layout of :data:`~llm_engine.quant.LAYOUTS`);
- ``int8``: CPU fp32 inference on Q8_0 / Q4_0 / Q4_1 weights (:data:`INT8_TYPES`), only
  when forced (``ops.use(quantized_linear="int8")``, ``--backend quantized_linear=int8``)
  or inside a decode step (:func:`~llm_engine.ops.decode_layers`, which takes it unless
  another implementation is forced): activations rounded to int8 per 32-block as
  llama.cpp does (:func:`int8_rounded`), then integer dot products with the blocks
  (``_C.quant_matmul(..., int8_activations=True)``);
- ``triton``: CUDA (the default there; CPU tensors under ``TRITON_INTERPRET=1``) without
  grad, Q8_0 / Q4_0 / Q4_1 weights: the weight-only GEMM of ``kernels/quant_matmul.py``
  on the weight repacked once into its layout (:func:`group_layout`);
- ``reference``: dequantize, then ``F.linear`` (other types and dtypes, autograd for ``x``).

``onednn`` and ``cpp`` keep ``x`` in fp32, so a row's result differs between them only by
the order of its sums. ``int8`` is not a default here: the rounding makes a result jump with
tiny changes of its input, so the ~1e-7 differences between routes (which change at
:data:`QUANT_GEMM_MIN_ROWS` rows) grow into different greedy tokens, and a row's tokens
would depend on the batch it shares. Forced, it takes every row count (bit for bit the
same result for a row whatever the batch).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llm_engine import _C
from llm_engine.ops import onednn
from llm_engine.ops.common import ANY, as_rows, cpp_needs, on_cuda, triton_needs
from llm_engine.ops.dispatch import Op, registry, tensor_facts
from llm_engine.quant import QUANT_TYPES, ROWS8_GROUP, QuantizedWeight

# From this many rows on, the CPU dequantizes tiles and runs oneDNN's GEMM, compute-bound
# there; below, the C++ kernel reads the quantized blocks (``llm-engine bench quant``).
QUANT_GEMM_MIN_ROWS = 64
_QUANT_TILE = 1 << 21
# Weight types the int8-activation kernel takes.
INT8_TYPES = frozenset(t for t in QUANT_TYPES if _C.quant_matmul_int8_supported(t))


def _signature(x: torch.Tensor, weight: QuantizedWeight,
               bias: torch.Tensor | None = None) -> tuple:
    rows = x.numel() // x.shape[-1] if x.dim() and x.shape[-1] else 0
    return (*tensor_facts("quantized_linear", x, bias),
            weight.blocks.is_cpu and (bias is None or bias.shape == (weight.out_features,)),
            rows >= QUANT_GEMM_MIN_ROWS and onednn.usable(),
            weight.qtype in GROUP_TYPES and weight.blocks.device == x.device,
            weight.qtype in INT8_TYPES)


QUANTIZED_LINEAR = registry().add(Op("quantized_linear", _signature, {
    "blocks": "the weight's blocks on the CPU, bias (out,) or None",
    "many_rows": f"at least {QUANT_GEMM_MIN_ROWS} rows, oneDNN usable (enabled, no CPU autocast)",
    "group_type": "q8_0/q4_0/q4_1 blocks on x's device",
    "int8_type": "/".join(sorted(INT8_TYPES)) + " weights",
}, "x @ W.T + bias, W quantized"))


def quantized_linear(x: torch.Tensor, weight: QuantizedWeight,
                     bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x (..., in) @ W.T + bias (out,)`` for a quantized ``W (out, in)``, in ``x``'s dtype."""
    if not isinstance(weight, QuantizedWeight):
        raise TypeError(f"weight must be a QuantizedWeight, got {type(weight).__name__}")
    if x.dim() == 0 or x.shape[-1] != weight.in_features:
        raise ValueError(f"x must be (..., {weight.in_features}) for a weight of shape "
                         f"{weight.shape}, got {tuple(x.shape)}")
    return QUANTIZED_LINEAR.pick(x, weight, bias)(x, weight, bias)


def _quantized_linear_onednn(x: torch.Tensor, weight: QuantizedWeight,
                             bias: torch.Tensor | None = None) -> torch.Tensor:
    x2 = as_rows(x)
    rows, n = x2.shape[0], weight.out_features
    threads = torch.get_num_threads()
    tile = max(ROWS8_GROUP, _QUANT_TILE // weight.in_features // ROWS8_GROUP * ROWS8_GROUP)
    out = None if n <= tile else x2.new_empty(rows, n)
    scratch = x2.new_empty(min(n, tile), weight.in_features)
    for a in range(0, n, tile):
        b = min(n, a + tile)
        w = scratch[:b - a]
        _C.quant_dequantize(w.numpy(), weight.blocks[a:b].numpy(), weight.qtype, threads,
                            layout=weight.layout)
        y = onednn.mm_bucketed(x2, w, None if bias is None else bias[a:b])
        if out is None:
            out = y
        else:
            out[:, a:b] = y
    return out.view(*x.shape[:-1], n)


def _quantized_linear_cpp(x: torch.Tensor, weight: QuantizedWeight,
                          bias: torch.Tensor | None = None, int8: bool = False) -> torch.Tensor:
    x2 = as_rows(x)
    out = x2.new_empty(x2.shape[0], weight.out_features)
    _C.quant_matmul(out.numpy(), x2.numpy(), weight.blocks.numpy(), weight.qtype,
                    torch.get_num_threads(), int8_activations=int8, layout=weight.layout)
    if bias is not None:
        out += bias
    return out.view(*x.shape[:-1], weight.out_features)


def _quantized_linear_int8(x: torch.Tensor, weight: QuantizedWeight,
                           bias: torch.Tensor | None = None) -> torch.Tensor:
    return _quantized_linear_cpp(x, weight, bias, int8=True)


def int8_rounded(x: torch.Tensor, block: int = 32) -> torch.Tensor:
    """``x (..., k)`` as the ``int8`` route sees it, in ``x``'s dtype: each block of
    ``block`` values along the last axis rounded to ``q * d`` with ``d = max|x| / 127``
    and ``q = round(x / d)`` to nearest, ties away from zero (``q`` in [-127, 127])."""
    if x.shape[-1] % block:
        raise ValueError(f"x's last dimension must be a multiple of {block}, got {x.shape[-1]}")
    xb = x.reshape(*x.shape[:-1], -1, block)
    d = xb.abs().amax(-1, keepdim=True) / 127
    v = xb * torch.where(d != 0, 1 / d, torch.zeros_like(d))
    t = v.trunc()
    q = t + ((v - t).abs() >= 0.5) * v.sign()
    return (q * d).reshape(x.shape)


# The types whose blocks are one scale (and offset) per 32 levels: the Triton GEMM's layout.
GROUP_TYPES = ("q8_0", "q4_0", "q4_1")


def group_layout(weight: QuantizedWeight) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """``(qweight, scales, offsets, bits)`` of a Q8_0 / Q4_0 / Q4_1 weight in the layout of
    ``kernels/quant_matmul.py`` (groups of 32; int8 levels, or uint4 levels packed two
    per byte; fp16 scales and offsets, the blocks' own values, so that ``level · scale +
    offset`` is the GGUF dequantization exactly), on the weight's device. Made once per
    weight and kept in ``weight.layouts``."""
    layout = weight.layouts.get("group")
    if layout is not None:
        return layout
    if weight.qtype not in GROUP_TYPES:
        raise ValueError(f"weight.qtype must be one of {GROUP_TYPES}, got {weight.qtype!r}")
    from llm_engine.kernels.quant_matmul import pack_int4  # imports Triton: not on CPU

    n, k = weight.shape
    b = weight.to_layout("rows").blocks.view(n * k // 32, -1)
    scales = b[:, :2].contiguous().view(torch.float16).view(n, k // 32)
    if weight.qtype == "q8_0":
        layout = (b[:, 2:].contiguous().view(torch.int8).view(n, k), scales,
                  torch.zeros_like(scales), 8)
    else:
        nibbles = b[:, 4:] if weight.qtype == "q4_1" else b[:, 2:]
        levels = torch.cat([nibbles & 0x0F, nibbles >> 4], dim=1).reshape(n, k)
        offsets = (b[:, 2:4].contiguous().view(torch.float16).view(n, k // 32)
                   if weight.qtype == "q4_1" else scales * -8)
        layout = (pack_int4(levels), scales, offsets, 4)
    weight.layouts["group"] = layout
    return layout


def _quantized_linear_triton(x: torch.Tensor, weight: QuantizedWeight,
                             bias: torch.Tensor | None = None) -> torch.Tensor:
    from llm_engine.kernels.quant_matmul import quant_matmul  # imports Triton: not on CPU

    qweight, scales, offsets, bits = group_layout(weight)
    out = quant_matmul(as_rows(x), qweight, scales, offsets, bits, 32)
    if bias is not None:
        out = out + bias.to(out.dtype)
    return out.view(*x.shape[:-1], weight.out_features)


def quantized_linear_reference(x: torch.Tensor, weight: QuantizedWeight,
                               bias: torch.Tensor | None = None) -> torch.Tensor:
    """Dequantize (:func:`llm_engine.quant.dequantize`) then ``F.linear``, in ``x``'s dtype."""
    w = weight.dequantize().to(device=x.device, dtype=x.dtype)
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))


def dequantize(weight: QuantizedWeight) -> torch.Tensor:
    """The fp32 ``(out, in)`` weight: the C++ kernel on the CPU, else the reference."""
    if not weight.blocks.is_cpu:
        return weight.dequantize()
    out = torch.empty(weight.shape, dtype=torch.float32)
    if out.numel():
        _C.quant_dequantize(out.numpy(), weight.blocks.numpy(), weight.qtype,
                            torch.get_num_threads(), layout=weight.layout)
    return out


QUANTIZED_LINEAR.register("triton", _quantized_linear_triton,
                          triton_needs(grad=False, facts=("group_type",)),
                          "Triton weight-only GEMM on the weight repacked once (group_layout)",
                          auto=on_cuda)
QUANTIZED_LINEAR.register("onednn", _quantized_linear_onednn,
                          cpp_needs(("blocks", "many_rows")),
                          "dequantized tiles (_C.quant_dequantize) into oneDNN's fp32 GEMM")
QUANTIZED_LINEAR.register("cpp", _quantized_linear_cpp, cpp_needs(("blocks",)),
                          "C++ CPU kernel on the blocks (_C.quant_matmul)")
QUANTIZED_LINEAR.register("int8", _quantized_linear_int8, cpp_needs(("blocks", "int8_type")),
                          "C++ CPU kernel, x rounded to int8 per 32-block as llama.cpp does "
                          "(_C.quant_matmul(..., int8_activations=True)); forced, or in a decode step",
                          auto=lambda sig: False)
QUANTIZED_LINEAR.register("reference", quantized_linear_reference, ANY,
                          "dequantize, then F.linear")
