"""Eligibility checks and layout helpers shared by the op families."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import torch

from llm_engine.kernels import interpreting
from llm_engine.ops.dispatch import Needs, Signature

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _triton_device(device: str) -> bool:
    return device == "cuda" or (device == "cpu" and interpreting())


def triton_needs(grad: bool, facts: tuple[str, ...] = ()) -> Needs:
    """The Triton kernels: CUDA tensors (CPU ones under ``TRITON_INTERPRET=1``), fp32/fp16/bf16;
    ``grad``: whether the kernel has a backward."""
    return Needs(dtypes=FLOAT_DTYPES, grad=grad, facts=facts, device_ok=_triton_device,
                 device_text="CUDA tensors (CPU ones with TRITON_INTERPRET=1)")


def triton_kernel(family: str, name: str) -> Callable[..., Any]:
    """The Triton launcher ``llm_engine.kernels.<family>.<name>`` as a function that imports
    its module at its first call: registering the ``triton`` implementations must not
    import Triton, which a CPU process never runs (and which costs it start-up time and
    memory)."""
    kernel: Callable[..., Any] | None = None

    def call(*args: Any, **kwargs: Any) -> Any:
        nonlocal kernel
        if kernel is None:
            kernel = getattr(importlib.import_module(f"llm_engine.kernels.{family}"), name)
        return kernel(*args, **kwargs)

    call.__name__ = call.__qualname__ = name
    call.__doc__ = f"``llm_engine.kernels.{family}.{name}``, imported at the first call."
    return call


def on_cuda(sig: Signature) -> bool:
    """Triton's default condition: only CUDA tensors (the interpreter is a test tool)."""
    return sig[1] == "cuda"


def cpp_needs(facts: tuple[str, ...] = ()) -> Needs:
    """The C++ CPU kernels of ``csrc/cpu/`` (``_C``): fp32 CPU tensors, no backward."""
    return Needs(devices=("cpu",), dtypes=(torch.float32,), grad=False, facts=facts)


ANY = Needs()


def rows_apart(t: torch.Tensor) -> bool:
    """Whether ``t (rows, heads, d)`` is contiguous within each row, its rows possibly
    apart (a slice of the QKV output): the layout the C++ kernels read in place."""
    return t.dim() == 3 and t.stride(2) == 1 and t.stride(1) == t.shape[2]


def as_rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a C-contiguous ``(rows, last dim)`` matrix (itself when it already is one:
    these wrappers run a few hundred times per decode step, so every call counts)."""
    return t if t.dim() == 2 and t.is_contiguous() else t.reshape(-1, t.shape[-1]).contiguous()


def rowwise(fn, x: torch.Tensor, *rest: torch.Tensor | None) -> torch.Tensor:
    """``fn`` applied to each row of ``x`` (and the same row of each ``rest``) alone, as
    a fresh ``(1, ...)`` tensor, the results concatenated: every row takes the code path
    of a one-row call whatever the batch (the ``rowwise`` implementations, batch-invariant
    by construction)."""
    if x.shape[0] == 0:
        return fn(x, *rest)
    return torch.cat([fn(x[i:i + 1].clone(), *(None if r is None else r[i:i + 1].clone()
                                               for r in rest)) for i in range(x.shape[0])])


def never(sig: Signature) -> bool:
    """An ``auto`` condition that always fails: the implementation runs only when forced."""
    return False
