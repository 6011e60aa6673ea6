"""The op dispatch's own CPU paths: the oneDNN linear, its packed weights and the rotary
embedding."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from testing_utils import assert_close

from llm_engine import ops

# (leading dims, in, out): odd sizes, one row, a 3-D batch, a wide output.
LINEAR_SHAPES = [((1,), 1, 1), ((1,), 7, 5), ((3,), 576, 960), ((2, 5), 33, 17), ((257,), 100, 3)]


@pytest.mark.parametrize("lead, n_in, n_out", LINEAR_SHAPES)
@pytest.mark.parametrize("bias", [False, True])
def test_linear_forward_and_gradients_match_f_linear(lead, n_in, n_out, bias) -> None:
    torch.manual_seed(0)
    x = torch.randn(*lead, n_in, dtype=torch.float64)
    w = torch.randn(n_out, n_in, dtype=torch.float64)
    b = torch.randn(n_out, dtype=torch.float64) if bias else None
    exact = F.linear(x, w, b)
    if torch.backends.mkldnn.is_available():  # the oneDNN path is the one under test
        assert ops.registry().choose("linear", x.float(), w.float(),
                                     None if b is None else b.float()) == "onednn"
    leaves = [t.float().requires_grad_() for t in (x, w, b) if t is not None]
    out = ops.linear(*leaves, *([None] if b is None else []))
    assert out.dtype == torch.float32 and out.shape == exact.shape
    assert_close(out, exact, torch.float32)
    dy = torch.randn_like(exact)
    grads = torch.autograd.grad(out, leaves, dy.float())
    exact_leaves = [t.clone().requires_grad_() for t in (x, w, b) if t is not None]
    exact_grads = torch.autograd.grad(F.linear(*exact_leaves, *([None] if b is None else [])),
                                      exact_leaves, dy)
    for name, g, ref in zip(("dx", "dweight", "dbias"), grads, exact_grads, strict=False):
        assert_close(g, ref, torch.float32, grad=True, what=name)


def test_linear_without_autograd_and_in_bf16_and_on_odd_inputs() -> None:
    torch.manual_seed(0)
    x, w = torch.randn(4, 64), torch.randn(48, 64)
    with torch.inference_mode():
        assert_close(ops.linear(x, w), F.linear(x.double(), w.double()), torch.float32)
    xb, wb = x.bfloat16(), w.bfloat16()
    out = ops.linear(xb, wb)
    assert out.dtype == torch.bfloat16
    assert_close(out, F.linear(xb.double(), wb.double()), torch.bfloat16)
    # Strided input, transposed weight, empty batch, 1-D input, mixed dtypes: all still right.
    wide = torch.randn(4, 100)[:, :64]
    assert_close(ops.linear(wide, w), F.linear(wide.double(), w.double()), torch.float32)
    wt = torch.randn(64, 48).t()
    assert_close(ops.linear(x, wt), F.linear(x.double(), wt.double()), torch.float32)
    assert ops.linear(torch.randn(0, 64), w).shape == (0, 48)
    assert_close(ops.linear(x[0], w), F.linear(x[0].double(), w.double()), torch.float32)
    with pytest.raises(RuntimeError):
        ops.linear(x.double(), w)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast still casts
        assert ops.linear(x, w).dtype == torch.bfloat16


needs_packing = pytest.mark.skipif(not hasattr(torch.ops.mkldnn, "_reorder_linear_weight"),
                                   reason="this PyTorch build has no oneDNN weight packing")


@needs_packing
@pytest.mark.parametrize("rows", [1, 2, 7, 32, 33, 300])
@pytest.mark.parametrize("bias", [False, True])
def test_packed_weight_gives_the_same_linear(rows, bias) -> None:
    torch.manual_seed(0)
    x, w = torch.randn(rows, 40), torch.randn(70, 40)
    b = torch.randn(70) if bias else None
    packed = ops.PackedWeight()
    with torch.inference_mode():
        out = ops.linear(x, w, b, packed=packed)
    assert packed.get(w).is_mkldnn and packed.get(w) is packed.get(w)  # packed once
    assert_close(out, F.linear(x.double(), w.double(), None if b is None else b.double()),
                 torch.float32)


def test_inference_linear_rounds_rows_up_to_few_shapes_and_keeps_the_result() -> None:
    from llm_engine.ops.onednn import bucket_rows

    buckets = [bucket_rows(m) for m in range(1, 8193)]
    assert buckets[:16] == list(range(1, 17)) and len(set(buckets)) < 100
    assert all(m <= r <= m + m // 8 for m, r in enumerate(buckets, 1))
    torch.manual_seed(0)
    x, w, b = torch.randn(3, 11, 40), torch.randn(70, 40), torch.randn(70)  # 33 rows -> 36
    with torch.inference_mode():
        out = ops.linear(x, w, b)
    assert out.shape == (3, 11, 70) and out.is_contiguous()
    assert_close(out, F.linear(x.double(), w.double(), b.double()), torch.float32)


@needs_packing
def test_packed_weight_follows_every_change_to_its_weight() -> None:
    torch.manual_seed(0)
    x = torch.randn(3, 16)
    layer = torch.nn.Linear(16, 8, bias=False)
    packed = ops.PackedWeight()

    def check() -> None:
        with torch.no_grad():
            assert_close(ops.linear(x, layer.weight, packed=packed),
                         F.linear(x.double(), layer.weight.double()), torch.float32)

    check()
    layer.weight.grad = torch.randn(8, 16)
    torch.optim.SGD(layer.parameters(), lr=1.0).step()  # an in-place update
    check()
    with torch.no_grad():
        layer.weight.mul_(-2)
    check()
    layer.weight.data = torch.randn(8, 16)  # a new tensor under the same parameter
    check()
    layer.weight = torch.nn.Parameter(torch.randn(8, 16))
    check()
    layer.weight = torch.nn.Parameter(torch.randn(8, 32)[:, ::2])  # strided
    check()


@needs_packing
def test_packed_weight_is_skipped_where_it_does_not_apply() -> None:
    torch.manual_seed(0)
    packed = ops.PackedWeight()
    for w in (torch.randn(8, 16).bfloat16(), torch.randn(8, 16).double(), torch.randn(16)):
        assert packed.get(w) is w
    with torch.inference_mode():
        w = torch.randn(8, 16)  # an inference tensor has no version to watch
    assert packed.get(w) is w
    # With autograd the weight itself is used, so gradients reach it.
    x, w = torch.randn(3, 16, requires_grad=True), torch.randn(8, 16, requires_grad=True)
    ops.linear(x, w, packed=packed).sum().backward()
    assert_close(w.grad, x.detach().double().sum(0).expand(8, 16), torch.float32, grad=True)


@needs_packing
def test_copies_of_a_packed_weight_start_empty() -> None:
    w = torch.randn(8, 16)
    packed = ops.PackedWeight()
    packed.get(w)
    for clone in (copy.deepcopy(packed), pickle.loads(pickle.dumps(packed))):
        assert clone._packed is None and clone._source is None
        assert_close(ops.linear(torch.ones(1, 16), w, packed=clone),
                     w.double().sum(1)[None], torch.float32)


def test_rope_matches_the_rotation_of_pairs() -> None:
    """Each (x[i], x[i + d/2]) pair turns by the angle position * theta^(-2i/d)."""
    head_dim, theta = 8, 100.0
    cos, sin = ops.rope_cos_sin(head_dim, 32, theta)
    positions = torch.tensor([0, 5, 31])
    x = torch.randn(3, 2, head_dim)
    out = ops.apply_rope(x, *ops.rope_at(positions, cos, sin))
    half = head_dim // 2
    angle = positions[:, None].double() * theta ** (-torch.arange(half).double() * 2 / head_dim)
    z = torch.complex(x[..., :half].double(), x[..., half:].double()) * torch.polar(
        torch.ones_like(angle), angle)[:, None, :]
    assert_close(out, torch.cat((z.real, z.imag), dim=-1), torch.float32)
    assert torch.equal(out[0], x[0])  # position 0 is the identity
