"""oneDNN's matmul on the CPU, as the linear layers (``matmul.py``) and the quantized ones
(``quantized.py``) run it: the op and its weight packing resolved once, and the row
count rounded to a bounded set of sizes."""

from __future__ import annotations

import torch

# oneDNN's linear op and its weight packing, resolved once (they are on the hot path:
# every projection of every layer); None where this PyTorch build lacks them.
LINEAR_POINTWISE = (torch.ops.mkldnn._linear_pointwise.default
                    if torch.backends.mkldnn.is_available()
                    and hasattr(torch.ops.mkldnn, "_linear_pointwise") else None)
REORDER_WEIGHT = (torch.ops.mkldnn._reorder_linear_weight.default
                  if LINEAR_POINTWISE is not None
                  and hasattr(torch.ops.mkldnn, "_reorder_linear_weight") else None)
# bf16 only where this CPU has oneDNN's bf16 support (AVX-512 BF16 or AMX); without it
# the bf16 primitive cannot be created.
ONEDNN_DTYPES = (torch.float32,) + (
    (torch.bfloat16,) if LINEAR_POINTWISE is not None
    and torch.ops.mkldnn._is_mkldnn_bf16_supported() else ())


def usable() -> bool:
    """Whether oneDNN's matmul can run now: built in, enabled, no CPU autocast."""
    return (LINEAR_POINTWISE is not None and torch.backends.mkldnn.enabled
            and not torch.is_autocast_enabled("cpu"))


def mm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x (..., in) @ weight.T + bias`` by oneDNN; has no autograd of its own."""
    return LINEAR_POINTWISE(x, weight, bias, "none", [], "")


def bucket_rows(rows: int) -> int:
    """``rows`` rounded up to one of 8 steps per power of two (exact up to 16): at most
    1/8 more rows, and 88 row counts up to 8192. oneDNN keeps a primitive for each
    shape it meets (in two caches of up to 1024 each), so an engine whose batches take
    every row count from 1 to thousands would otherwise grow its memory with each new
    batch size until those caches are full."""
    if rows <= 16:
        return rows
    step = 1 << (rows.bit_length() - 4)
    return -(-rows // step) * step


def mm_bucketed(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """:func:`mm` with the rows of ``x (..., in)`` zero-padded to :func:`bucket_rows` and
    the result cut back, for inference (a padded row changes no other row's result)."""
    x2 = x.reshape(-1, x.shape[-1])
    rows = bucket_rows(x2.shape[0])
    if rows == x2.shape[0]:
        return mm(x, weight, bias)
    padded = x2.new_empty((rows, x2.shape[1]))
    padded[:x2.shape[0]] = x2
    padded[x2.shape[0]:] = 0
    return mm(padded, weight, bias)[:x2.shape[0]].view(*x.shape[:-1], -1)
