"""LayerNorm / RMSNorm Triton kernels against their references and torch's own norms.

Without CUDA the kernels run in the Triton interpreter on CPU tensors (fp32, fp16,
small shapes); ``gpu``-marked tests cover bf16 and large shapes on CUDA.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from llm_engine.kernels.layer_norm import (
    _MAX_BWD_BLOCK_N,
    _MAX_FWD_BLOCK_N,
    layer_norm,
    layer_norm_reference,
    rms_norm,
    rms_norm_reference,
)
from testing_utils import GRAD_REL_TOL, REL_TOL, assert_close, interpreter_or_cuda

DEVICE = interpreter_or_cuda()
WIDE = max(_MAX_FWD_BLOCK_N, _MAX_BWD_BLOCK_N) + 37  # wider than one block: loop over the row

# (rows, hidden): 257 rows only with narrow rows, the interpreter is slow on big tiles.
SHAPES = [
    (1, 1), (3, 1), (257, 1), (1, 7), (257, 7), (3, 100), (257, 100),
    (3, 576), (1, 768), (3, 1000), (3, WIDE),
]
# (norm, has_bias, has_residual)
VARIANTS = [
    ("layer", False, False), ("layer", True, False), ("layer", False, True), ("layer", True, True),
    ("rms", False, False), ("rms", False, True),
]


def _eps(norm: str, hidden: int) -> float:
    # With hidden 1 the RMSNorm gradient is eps/(x**2 + eps)**1.5: pure cancellation in
    # fp32 for a tiny eps, in the kernel and the references alike. A large eps keeps it
    # measurable (LayerNorm's gradient is exactly zero there).
    if norm == "rms":
        return 1e-1 if hidden == 1 else 1e-6
    return 1e-5


def _triton(norm, x, w, b, r, eps):
    if norm == "layer":
        return layer_norm(x, w, b, eps=eps, residual=r)
    return rms_norm(x, w, eps=eps, residual=r)


def _reference(norm, x, w, b, r, eps):
    if norm == "layer":
        return layer_norm_reference(x, w, b, eps=eps, residual=r)
    return rms_norm_reference(x, w, eps=eps, residual=r)


def _torch_functional(norm, x, w, b, r, eps):
    """torch's own LayerNorm / RMSNorm, in fp64 on the (rounded) h, cast back to x's dtype."""
    h = x if r is None else x + r
    hd, wd = h.double(), w.double()
    if norm == "layer":
        y = F.layer_norm(hd, (h.shape[-1],), wd, b.double() if b is not None else None, eps)
    else:
        y = F.rms_norm(hd, (h.shape[-1],), wd, eps)
    y = y.to(x.dtype)
    return y if r is None else (y, h)


def _assert_close(out, ref, dtype, *, grad=False, what="output"):
    """The table's relative bound; a reference that is zero up to rounding (LayerNorm's
    dweight and dx at hidden 1) is compared in absolute terms instead."""
    if ref.double().abs().max() < 1e-10:
        bound = (GRAD_REL_TOL if grad else REL_TOL)[dtype]
        assert out.double().abs().max() < bound, f"{what}: {out} is not zero"
    else:
        assert_close(out, ref, dtype, grad=grad, what=what)


def _make_inputs(shape, dtype, has_bias, has_residual, weight_dtype=None, device=DEVICE):
    hidden = shape[-1]
    weight_dtype = weight_dtype or dtype
    x = torch.randn(shape, device=device).to(dtype).requires_grad_()
    w = (1 + 0.5 * torch.randn(hidden, device=device)).to(weight_dtype).requires_grad_()
    b = torch.randn(hidden, device=device).to(weight_dtype).requires_grad_() if has_bias else None
    r = torch.randn(shape, device=device).to(dtype).requires_grad_() if has_residual else None
    return x, w, b, r


def _run(fn, norm, inputs, grads_out, eps):
    """Forward through ``fn``, then gradients of every input for the given output gradients."""
    x, w, b, r = inputs
    out = fn(norm, x, w, b, r, eps)
    outs = out if isinstance(out, tuple) else (out,)
    leaves = [t for t in (x, w, b, r) if t is not None]
    grads = torch.autograd.grad(outs, leaves, grads_out[: len(outs)])
    return [o.detach() for o in outs], grads


def _check_against_references(norm, shape, dtype, has_bias, has_residual, *, eps=None,
                              weight_dtype=None, device=DEVICE):
    eps = _eps(norm, shape[-1]) if eps is None else eps
    inputs = _make_inputs(shape, dtype, has_bias, has_residual, weight_dtype, device)
    grads_out = (torch.randn(shape, device=device).to(dtype),
                 torch.randn(shape, device=device).to(dtype))
    outs, grads = _run(_triton, norm, inputs, grads_out, eps)
    names = [n for n, t in zip(("dx", "dweight", "dbias", "dresidual"), inputs, strict=True) if t is not None]
    for ref_fn in (_reference, _torch_functional):
        ref_outs, ref_grads = _run(ref_fn, norm, inputs, grads_out, eps)
        for name, out, ref in zip(("y", "h"), outs, ref_outs, strict=False):
            assert out.dtype == ref.dtype == dtype
            _assert_close(out, ref, dtype, what=f"{name} vs {ref_fn.__name__}")
        for name, g, ref in zip(names, grads, ref_grads, strict=True):
            assert g.dtype == ref.dtype
            _assert_close(g, ref, dtype, grad=True, what=f"{name} vs {ref_fn.__name__}")


@pytest.mark.parametrize("norm,has_bias,has_residual", VARIANTS)
@pytest.mark.parametrize("rows,hidden", SHAPES)
def test_fp32_forward_and_gradients_match_references(rows, hidden, norm, has_bias, has_residual):
    _check_against_references(norm, (rows, hidden), torch.float32, has_bias, has_residual)


# fp16 shares the code paths checked above; the interpreter is slow, so fewer variants.
@pytest.mark.parametrize("norm,has_bias,has_residual",
                         [("layer", True, True), ("layer", False, False), ("rms", False, True)])
@pytest.mark.parametrize("rows,hidden", SHAPES)
def test_fp16_forward_and_gradients_match_references(rows, hidden, norm, has_bias, has_residual):
    _check_against_references(norm, (rows, hidden), torch.float16, has_bias, has_residual)


@pytest.mark.parametrize("norm", ["layer", "rms"])
def test_any_number_of_leading_dims(norm):
    _check_against_references(norm, (2, 3, 5, 96), torch.float32, norm == "layer", True)
    _check_against_references(norm, (40,), torch.float32, norm == "layer", False)


@pytest.mark.parametrize("norm", ["layer", "rms"])
def test_fp32_weight_with_fp16_activations_keeps_each_dtype(norm):
    _check_against_references(norm, (5, 64), torch.float16, norm == "layer", True,
                              weight_dtype=torch.float32)


@pytest.mark.parametrize("norm", ["layer", "rms"])
def test_rows_with_a_stride_are_read_in_place(norm):
    big = torch.randn(6, 80, device=DEVICE)
    x = big[:, 5:69]  # row stride 80, unit stride along hidden
    w = torch.randn(64, device=DEVICE)
    out = _triton(norm, x, w, None, None, 1e-5)
    assert_close(out, _reference(norm, x, w, None, None, 1e-5), torch.float32)


@pytest.mark.parametrize("norm", ["layer", "rms"])
def test_gradient_arriving_only_on_h_passes_to_x_and_residual(norm):
    x, w, b, r = _make_inputs((4, 33), torch.float32, norm == "layer", True)
    _, h = _triton(norm, x, w, b, r, 1e-5)
    gh = torch.randn_like(h)
    dx, dr, dw = torch.autograd.grad(h, (x, r, w), gh, allow_unused=True)
    torch.testing.assert_close(dx, gh, rtol=0, atol=0)
    torch.testing.assert_close(dr, gh, rtol=0, atol=0)
    assert dw is None or torch.count_nonzero(dw) == 0


def test_x_and_residual_leaf_gradients_do_not_share_memory():
    x, w, _, r = _make_inputs((4, 8), torch.float32, False, True)
    y, h = rms_norm(x, w, residual=r)
    (y.sum() + h.sum()).backward()
    torch.testing.assert_close(x.grad, r.grad, rtol=0, atol=0)
    x.grad.add_(1.0)
    assert not torch.equal(x.grad, r.grad)


@pytest.mark.parametrize("norm", ["layer", "rms"])
@pytest.mark.parametrize("hidden", [100, WIDE])
def test_weight_and_bias_gradients_are_identical_run_to_run(norm, hidden):
    rows = 257 if hidden <= 128 else 9
    x, w, b, _ = _make_inputs((rows, hidden), torch.float32, norm == "layer", False)
    dy = torch.randn(rows, hidden, device=DEVICE)
    leaves = [t for t in (w, b) if t is not None]
    first = torch.autograd.grad(_triton(norm, x, w, b, None, 1e-5), leaves, dy)
    second = torch.autograd.grad(_triton(norm, x, w, b, None, 1e-5), leaves, dy)
    for g1, g2 in zip(first, second, strict=True):
        assert torch.equal(g1, g2)


@pytest.mark.parametrize("norm", ["layer", "rms"])
def test_zero_rows_give_empty_outputs_and_zero_weight_gradient(norm):
    x, w, b, r = _make_inputs((0, 16), torch.float32, norm == "layer", True)
    y, h = _triton(norm, x, w, b, r, 1e-5)
    assert y.shape == h.shape == (0, 16)
    (dw,) = torch.autograd.grad(y, (w,), torch.ones_like(y))
    assert torch.equal(dw, torch.zeros_like(w))


def test_normalised_rows_have_zero_mean_and_unit_variance():
    x = 3 + 2 * torch.randn(8, 300, device=DEVICE)
    y = layer_norm(x, torch.ones(300, device=DEVICE), eps=0.0)
    torch.testing.assert_close(y.mean(-1), torch.zeros(8, device=DEVICE), atol=1e-5, rtol=0)
    torch.testing.assert_close(y.var(-1, unbiased=False), torch.ones(8, device=DEVICE),
                               atol=1e-4, rtol=0)
    z = rms_norm(x, torch.ones(300, device=DEVICE), eps=0.0)
    torch.testing.assert_close(z.square().mean(-1), torch.ones(8, device=DEVICE),
                               atol=1e-4, rtol=0)


def _bad_calls():
    x = torch.randn(4, 8, device=DEVICE)
    w = torch.randn(8, device=DEVICE)
    return {
        "weight_hidden": (lambda: layer_norm(x, torch.randn(7, device=DEVICE)), "weight"),
        "weight_2d": (lambda: rms_norm(x, torch.randn(1, 8, device=DEVICE)), "weight"),
        "weight_int": (lambda: rms_norm(x, torch.ones(8, dtype=torch.int32, device=DEVICE)),
                       "weight"),
        "weight_device": (lambda: layer_norm(x, torch.randn(8, device="meta")), "weight"),
        "x_int": (lambda: layer_norm(torch.ones(4, 8, dtype=torch.int64, device=DEVICE), w),
                  "x"),
        "x_empty_hidden": (lambda: layer_norm(torch.randn(4, 0, device=DEVICE), w[:0]), "x"),
        "bias_hidden": (lambda: layer_norm(x, w, torch.randn(9, device=DEVICE)), "bias"),
        "bias_dtype": (lambda: layer_norm(x, w, torch.randn(8, device=DEVICE).half()), "bias"),
        "residual_shape": (lambda: layer_norm(x, w, residual=torch.randn(4, 9, device=DEVICE)),
                           "residual"),
        "residual_dtype": (lambda: rms_norm(x, w, residual=x.half()), "residual"),
        "residual_device": (lambda: rms_norm(x, w, residual=torch.randn(4, 8, device="meta")),
                            "residual"),
        "eps_negative": (lambda: rms_norm(x, w, eps=-1.0), "eps"),
    }


@pytest.mark.parametrize("case", list(_bad_calls()))
def test_invalid_arguments_raise_value_error_naming_the_argument(case):
    call, name = _bad_calls()[case]
    with pytest.raises(ValueError, match=rf"^{name}\b"):
        call()


def test_non_tensor_x_raises_type_error():
    with pytest.raises(TypeError, match="^x"):
        layer_norm([[1.0, 2.0]], torch.ones(2, device=DEVICE))


@pytest.mark.gpu
@pytest.mark.parametrize("norm,has_bias,has_residual", VARIANTS)
@pytest.mark.parametrize("rows,hidden", [(4096, 1024), (2048, 4096), (1024, 8192), (257, 576),
                                         (33, 20000), (1, 8192)])
def test_bf16_large_shapes_match_references_on_gpu(rows, hidden, norm, has_bias, has_residual):
    _check_against_references(norm, (rows, hidden), torch.bfloat16, has_bias, has_residual,
                              device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("norm", ["layer", "rms"])
def test_large_shapes_match_references_on_gpu(norm, dtype):
    _check_against_references(norm, (8192, 4096), dtype, norm == "layer", True, device="cuda")
    _check_against_references(norm, (64, 40000), dtype, norm == "layer", True, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("norm", ["layer", "rms"])
def test_bf16_weight_gradients_are_identical_run_to_run_on_gpu(norm):
    x, w, b, r = _make_inputs((16384, 2048), torch.bfloat16, norm == "layer", True,
                              device="cuda")
    dy = torch.randn(16384, 2048, device="cuda", dtype=torch.bfloat16)
    leaves = [t for t in (w, b) if t is not None]
    first = torch.autograd.grad(_triton(norm, x, w, b, r, 1e-5)[0], leaves, dy)
    second = torch.autograd.grad(_triton(norm, x, w, b, r, 1e-5)[0], leaves, dy)
    for g1, g2 in zip(first, second, strict=True):
        assert torch.equal(g1, g2)
