"""LayerNorm / RMSNorm: GB/s of the bytes each pass must move.

Variants: ``layer_norm`` (weight and bias), ``rms_norm`` (weight), and
``rms_norm+residual`` (the pre-norm block's fused ``h = x + residual; y = norm(h)``,
gradient arriving on both ``y`` and ``h``). Modes: ``fwd`` (the training forward),
``bwd`` (the backward alone, through ``torch.autograd.grad`` on a kept graph) and
``fwd+bwd``. Cases: rows × hidden from 4096×1024 to 32768×8192 in bf16 on CUDA;
tiny fp32 cases on CPU.

Bytes that must move (``e`` bytes per activation element, ``ew`` per weight element):
forward reads x (and residual), weight (and bias) and writes y (and h) plus fp32
mean (LayerNorm) and rstd per row; backward reads dy (and the gradient on h), the
normalised input, weight, mean/rstd and writes dx plus dweight (and dbias); the
residual's gradient is dx itself. ``fwd+bwd`` counts both.

Implementations: ``llm_engine`` (the Triton kernels), ``torch``
(``F.layer_norm`` / ``F.rms_norm``, the residual added in eager), ``torch.compile``
(the plain-PyTorch reference compiled), ``liger`` (Liger-Kernel's LayerNorm, RMSNorm
and fused add+RMSNorm) when importable. ``rel_err`` is of ``y`` (fwd) or of ``dx``
(bwd, fwd+bwd) against the reference run in fp32 on upcast inputs. On CPU
``llm_engine`` is the kernel under ``TRITON_INTERPRET=1``, else the PyTorch
reference (noted either way: not a speed figure for the kernel).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

from llm_engine.bench.common import INTERPRETER_NOTE, OURS, Ceilings, Row, rel_error, time_ms
from llm_engine.kernels._utils import interpreting
from llm_engine.kernels.layer_norm import (
    layer_norm,
    layer_norm_reference,
    rms_norm,
    rms_norm_reference,
)

SUITE = "layer_norm"
VARIANTS = ("layer_norm", "rms_norm", "rms_norm+residual")
MODES = ("fwd", "bwd", "fwd+bwd")
EPS = 1e-5

# An implementation maps (x, weight, bias or None, residual or None) to y or (y, h).
Impl = Callable[..., object]


def _cases(device: str, quick: bool) -> list[tuple[int, int]]:
    """(rows, hidden) pairs."""
    if torch.device(device).type != "cuda":
        return [(64, 256)] if quick else [(256, 1024), (1024, 1024)]
    if quick:
        return [(4096, 1024), (8192, 4096)]
    return [(4096, 1024), (8192, 2048), (4096, 8192), (16384, 4096), (32768, 8192)]


def _bytes(variant: str, mode: str, rows: int, hidden: int, elem: int, w_elem: int) -> int:
    residual = variant.endswith("+residual")
    ln = variant == "layer_norm"
    act = rows * hidden * elem
    stats = rows * 4 * (2 if ln else 1)
    # forward reads weight (and bias); backward reads weight, writes dweight (and dbias)
    fwd = act * (2 + 2 * residual) + hidden * w_elem * (2 if ln else 1) + stats
    bwd = act * (3 + residual) + hidden * w_elem * (3 if ln else 2) + stats
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]


def _ours(variant: str) -> Impl:
    if variant == "layer_norm":
        return lambda x, w, b, r: layer_norm(x, w, b, EPS, residual=r)
    return lambda x, w, b, r: rms_norm(x, w, EPS, residual=r)


def _reference(variant: str) -> Impl:
    if variant == "layer_norm":
        return lambda x, w, b, r: layer_norm_reference(x, w, b, EPS, residual=r)
    return lambda x, w, b, r: rms_norm_reference(x, w, EPS, residual=r)


def _torch(variant: str) -> Impl:
    def run(x, w, b, r):
        h = x if r is None else x + r
        if variant == "layer_norm":
            y = F.layer_norm(h, (h.shape[-1],), w, b, EPS)
        else:
            y = F.rms_norm(h, (h.shape[-1],), w, EPS)
        return y if r is None else (y, h)

    return run


def _compiled(variant: str) -> Impl:
    """The reference compiled afresh (one case's shapes, no recompile limit reached)."""
    torch._dynamo.reset()
    ref = layer_norm_reference if variant == "layer_norm" else rms_norm_reference
    compiled = torch.compile(ref, dynamic=False)
    if variant == "layer_norm":
        return lambda x, w, b, r: compiled(x, w, b, EPS, residual=r)
    return lambda x, w, b, r: compiled(x, w, EPS, residual=r)


def _liger(variant: str) -> tuple[Impl | None, str]:
    try:
        if variant == "layer_norm":
            from liger_kernel.ops.layer_norm import LigerLayerNormFunction

            return (lambda x, w, b, r: LigerLayerNormFunction.apply(x, w, b, EPS)), ""
        if variant == "rms_norm":
            from liger_kernel.ops.rms_norm import LigerRMSNormFunction

            return (lambda x, w, b, r: LigerRMSNormFunction.apply(x, w, EPS, 0.0, "llama",
                                                                  False)), ""
        from liger_kernel.ops.fused_add_rms_norm import LigerFusedAddRMSNormFunction

        return (lambda x, w, b, r: LigerFusedAddRMSNormFunction.apply(x, r, w, EPS, 0.0,
                                                                      "llama", False)), ""
    except ImportError as e:
        return None, f"Liger-Kernel not installed ({e})"


class _Case:
    """Inputs, upstream gradients and fp32 truth of one (variant, rows, hidden)."""

    def __init__(self, variant: str, rows: int, hidden: int, dtype: torch.dtype, device: str):
        def act() -> torch.Tensor:
            return torch.randn(rows, hidden, device=device, dtype=dtype, requires_grad=True)

        self.x = act()
        self.w = (1 + 0.1 * torch.randn(hidden, device=device, dtype=dtype)).requires_grad_()
        self.b = (torch.randn(hidden, device=device, dtype=dtype).requires_grad_()
                  if variant == "layer_norm" else None)
        self.r = act() if variant.endswith("+residual") else None
        self.grads = [torch.randn(rows, hidden, device=device, dtype=dtype)
                      for _ in range(1 if self.r is None else 2)]
        up = [t.detach().float().requires_grad_() if t is not None else None for t in self.inputs]
        outs = self._outs(_reference(variant)(*up))
        self.y_ref = outs[0].detach()
        (self.dx_ref,) = torch.autograd.grad(outs, [up[0]], [g.float() for g in self.grads])

    @property
    def inputs(self) -> tuple:
        return self.x, self.w, self.b, self.r

    @staticmethod
    def _outs(out) -> list[torch.Tensor]:
        return list(out) if isinstance(out, tuple) else [out]

    def forward(self, impl: Impl) -> list[torch.Tensor]:
        return self._outs(impl(*self.inputs))

    def backward(self, outs: list[torch.Tensor]) -> torch.Tensor:
        """dx; the graph of ``outs`` is kept so the backward can be timed again."""
        leaves = [t for t in self.inputs if t is not None]
        return torch.autograd.grad(outs, leaves, self.grads, retain_graph=True)[0]


def _measure(case: _Case, impl: Impl, mode: str, device: str, quick: bool) -> tuple[float, float]:
    """(median ms, rel_err) of one implementation in one mode."""
    if mode == "fwd":
        ms = time_ms(lambda: case.forward(impl), device, quick=quick)
        return ms, rel_error(case.forward(impl)[0], case.y_ref)
    if mode == "bwd":
        outs = case.forward(impl)
        ms = time_ms(lambda: case.backward(outs), device, quick=quick)
        return ms, rel_error(case.backward(outs), case.dx_ref)
    ms = time_ms(lambda: case.backward(case.forward(impl)), device, quick=quick)
    return ms, rel_error(case.backward(case.forward(impl)), case.dx_ref)


def iter_rows(device: str, quick: bool, ceilings: Ceilings) -> Iterator[Row]:
    cuda = torch.device(device).type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    elem = torch.finfo(dtype).bits // 8
    liger = {v: (_liger(v) if cuda else (None, "Liger-Kernel needs CUDA")) for v in VARIANTS}
    for rows, hidden in _cases(device, quick):
        params = {"rows": rows, "hidden": hidden}
        for variant in VARIANTS:
            ours, ours_note = _ours(variant), ""
            if interpreting():
                ours_note = INTERPRETER_NOTE
            elif not cuda:
                ours = _reference(variant)
                ours_note = "CPU: the engine's PyTorch path (the reference), not the kernel"
            compiled, compiled_note = ((_compiled(variant), "") if cuda
                                       else (None, "skipped on CPU (compile time)"))
            impls: list[tuple[str, Impl | None, str]] = [
                (OURS, ours, ours_note), ("torch", _torch(variant), ""),
                ("torch.compile", compiled, compiled_note), ("liger", *liger[variant]),
            ]
            case = _Case(variant, rows, hidden, dtype, device)
            for mode in MODES:
                name = f"{variant} {mode} {rows}x{hidden}"
                nbytes = _bytes(variant, mode, rows, hidden, elem, elem)
                for impl_name, impl, note in impls:
                    yield _row(case, name, params, impl_name, impl, note, mode, nbytes,
                               device, quick, ceilings)
            del case


def _row(case: _Case, name: str, params: dict, impl_name: str, impl: Impl | None, note: str,
         mode: str, nbytes: int, device: str, quick: bool, ceilings: Ceilings) -> Row:
    if impl is None:
        return Row(SUITE, name, impl_name, "GB/s", None, params=params, note=note)
    try:
        ms, err = _measure(case, impl, mode, device, quick)
    except Exception as e:  # a reference failing (torch.compile, Liger) is reported, not fatal
        if impl_name == OURS:
            raise
        return Row(SUITE, name, impl_name, "GB/s", None, params=params,
                   note=f"failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
    gbps = nbytes / (ms * 1e-3) / 1e9
    return Row(SUITE, name, impl_name, "GB/s", gbps, ms=ms, rel_err=err,
               ceiling_frac=gbps / ceilings.bandwidth_gbps, params=params, note=note)


def run(device: str, quick: bool, ceilings: Ceilings) -> list[Row]:
    """Rows for every variant, case, mode and implementation (see the module docstring)."""
    return list(iter_rows(device, quick, ceilings))
