"""Input checks and small helpers shared by the kernel launchers.

Every launcher validates its inputs with these before launching, so a bad
call fails with a ``ValueError``/``TypeError`` that names the argument and
the expected form instead of a crash inside Triton.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Iterable

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check_tensor(
    name: str,
    t: object,
    *,
    dtypes: Iterable[torch.dtype] | None = None,
    ndim: int | Iterable[int] | None = None,
    device: torch.device | None = None,
) -> torch.Tensor:
    """Validate one tensor argument and return it.

    Raises ``TypeError`` if ``t`` is not a tensor and ``ValueError`` for a wrong
    dtype, number of dimensions or device, naming ``name`` and showing the shape.
    """
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None:
        dtypes = tuple(dtypes)
        if t.dtype not in dtypes:
            allowed = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
            raise ValueError(f"{name} must have dtype in ({allowed}), got {t.dtype}")
    if ndim is not None:
        dims = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if t.dim() not in dims:
            raise ValueError(
                f"{name} must have {' or '.join(map(str, dims))} dimensions, "
                f"got shape {tuple(t.shape)}"
            )
    if device is not None and t.device != device:
        raise ValueError(f"{name} must be on {device}, got {t.device}")
    return t


def check_triton_device(name: str, t: torch.Tensor) -> None:
    """Triton runs on CUDA tensors, or on CPU tensors only under the interpreter."""
    if t.device.type == "cuda":
        return
    if t.device.type == "cpu" and interpreting():
        return
    raise ValueError(
        f"{name} is on {t.device}: Triton kernels need a CUDA tensor "
        "(or TRITON_INTERPRET=1 for CPU tensors); use llm_engine.ops to fall back to PyTorch"
    )


def check_last_dim_contiguous(name: str, t: torch.Tensor) -> None:
    """Kernels index the last dimension with unit stride."""
    if t.dim() > 0 and t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(
            f"{name} must be contiguous in its last dimension, got shape {tuple(t.shape)} "
            f"with strides {t.stride()}"
        )


def resolve_softmax_scale(softmax_scale: float | None, head_dim: int) -> float:
    """The attention scale: ``1 / sqrt(head_dim)`` for None, else ``softmax_scale``
    checked to be a positive finite number (not a bool)."""
    if softmax_scale is None:
        return 1.0 / math.sqrt(head_dim)
    if not isinstance(softmax_scale, (int, float)) or isinstance(softmax_scale, bool) \
            or not math.isfinite(softmax_scale) or softmax_scale <= 0:
        raise ValueError(f"softmax_scale must be a positive finite number or None, "
                         f"got {softmax_scale!r}")
    return float(softmax_scale)


@functools.cache
def sm_count(device_index: int) -> int:
    """Streaming multiprocessors of CUDA device ``device_index`` (asked once)."""
    return torch.cuda.get_device_properties(device_index).multi_processor_count
