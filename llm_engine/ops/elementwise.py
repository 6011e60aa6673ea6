"""The SwiGLU activation and the rotary embedding."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llm_engine import _C
from llm_engine.ops.common import ANY, as_rows, cpp_needs, never, rows_apart, rowwise
from llm_engine.ops.dispatch import Op, registry, tensor_facts

SILU_MUL = registry().add(Op("silu_mul", lambda h: tensor_facts("silu_mul", h),
                             summary="silu(gate) * up"))


def _rope_signature(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple:
    return (*tensor_facts("apply_rope", x, cos, sin),
            rows_apart(x) and cos.shape == sin.shape == (x.shape[0], 1, x.shape[2])
            and cos.is_contiguous() and sin.is_contiguous())


APPLY_ROPE = registry().add(Op("apply_rope", _rope_signature, {
    "layout": "x (tokens, heads, d) contiguous per token, cos/sin (tokens, 1, d) contiguous",
}, "rotary embedding"))


def silu_mul(h: torch.Tensor) -> torch.Tensor:
    """The SwiGLU activation ``silu(gate) * up`` of ``h (..., 2·width) = [gate | up]``;
    returns ``(..., width)``."""
    if h.dim() == 0 or h.shape[-1] % 2:
        raise ValueError(f"h must have an even last dimension [gate | up], got {tuple(h.shape)}")
    return SILU_MUL.pick(h)(h)


def _silu_mul_cpp(h: torch.Tensor) -> torch.Tensor:
    h2 = as_rows(h)
    out = h2.new_empty(h2.shape[0], h2.shape[1] // 2)
    _C.silu_mul(out.numpy(), h2.numpy(), torch.get_num_threads())
    return out.view(*h.shape[:-1], h.shape[-1] // 2)


def silu_mul_reference(h: torch.Tensor) -> torch.Tensor:
    """Plain-PyTorch :func:`silu_mul`."""
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate) * up


def rope_cos_sin(
    head_dim: int, max_positions: int, theta: float, device: torch.device | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary tables ``cos, sin: (max_positions, head_dim // 2)`` fp32."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    angles = torch.outer(torch.arange(max_positions, dtype=torch.float64), inv_freq)
    return angles.cos().float().to(device), angles.sin().float().to(device)


def rope_at(
    positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary factors at ``positions (tokens,)`` for :func:`apply_rope`, from the
    ``(max_positions, head_dim // 2)`` tables: ``(cos, cos)`` and ``(-sin, sin)`` side by
    side, each ``(tokens, 1, head_dim)``. Built once per forward, shared by every layer."""
    c, s = cos[positions].unsqueeze(1), sin[positions].unsqueeze(1)
    return torch.cat((c, c), dim=-1), torch.cat((-s, s), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x (tokens, heads, head_dim)`` by the factors of :func:`rope_at`
    (half-split layout).

    The first and second halves of the head dimension form the (real, imaginary)
    pairs, as in HF Llama: ``x * cos + swap_halves(x) * sin``, with the sign folded
    into ``sin``. Computed in fp32, returned in ``x``'s dtype.
    """
    return APPLY_ROPE.pick(x, cos, sin)(x, cos, sin)


def _apply_rope_cpp(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    out = torch.empty(x.shape, dtype=x.dtype)
    _C.rope(out.numpy(), x.numpy(), cos.numpy(), sin.numpy(), torch.get_num_threads())
    return out


def apply_rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Plain-PyTorch :func:`apply_rope`."""
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    return torch.addcmul(xf * cos, torch.cat((x2, x1), dim=-1), sin).to(x.dtype)


SILU_MUL.register("cpp", _silu_mul_cpp, cpp_needs(), "C++ CPU kernel (_C.silu_mul)")
SILU_MUL.register("reference", silu_mul_reference, ANY, "plain PyTorch")
APPLY_ROPE.register("cpp", _apply_rope_cpp, cpp_needs(("layout",)), "C++ CPU kernel (_C.rope)")
APPLY_ROPE.register("reference", apply_rope_reference, ANY, "plain PyTorch, in fp32")


def _silu_mul_rowwise(h: torch.Tensor) -> torch.Tensor:
    flat = h.reshape(-1, h.shape[-1])
    return rowwise(silu_mul_reference, flat).view(*h.shape[:-1], h.shape[-1] // 2)


def _apply_rope_rowwise(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return rowwise(apply_rope_reference, x, cos, sin)


SILU_MUL.register("rowwise", _silu_mul_rowwise, ANY,
                  "plain PyTorch one row at a time: batch-invariant (only when forced)",
                  auto=never)
APPLY_ROPE.register("rowwise", _apply_rope_rowwise, ANY,
                    "plain PyTorch one token at a time: batch-invariant (only when forced)",
                    auto=never)
