"""The C++ CPU layer ops (``_C.rms_norm``, ``silu_mul``, ``rope``, ``store_kv``) against
the PyTorch references, their input checks, and when ``ops`` picks them: fp32 CPU
tensors with no gradient wanted."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from llm_engine.kernels.layer_norm import rms_norm_reference
from llm_engine.kernels.paged_attention import store_kv_cache_reference
from testing_utils import assert_close

from llm_engine import _C, ops

# Rows: none, one, odd, enough to run on both threads (the kernels go parallel from
# 2^14 floats). Widths: 1, odd, SmolLM2's.
ROWS = [0, 1, 7, 300]


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("dim", [1, 7, 576])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_matches_reference(rows, dim, with_residual) -> None:
    x, w = torch.randn(rows, dim), torch.randn(dim)
    residual = torch.randn(rows, dim) if with_residual else None
    with torch.inference_mode():
        ref = rms_norm_reference(x.double(), w.double(), eps=1e-5,
                                 residual=None if residual is None else residual.double())
        with ops.use(rms_norm="cpp"):
            out = ops.rms_norm(x, w, 1e-5, residual=residual)
    if with_residual:
        assert_close(out[0], ref[0], torch.float32)
        assert torch.equal(out[1], x + residual)  # the sum is exact in fp32 either way
    else:
        assert_close(out, ref, torch.float32)


def test_rms_norm_handles_large_and_tiny_rows() -> None:
    x = torch.tensor([[3e18, -4e18, 0.0], [1e-30, 0.0, 0.0], [0.0, 0.0, 0.0]])
    w = torch.ones(3)
    with torch.inference_mode(), ops.use(rms_norm="cpp"):
        assert_close(ops.rms_norm(x[1:], w, 1e-6), rms_norm_reference(x[1:], w, 1e-6),
                     torch.float32)
        out = ops.rms_norm(x[:1] * 1e-10, w, 0.0)  # eps 0: exactly x / rms(x)
    assert_close(out, x[:1] / (x[:1].pow(2).mean().sqrt()), torch.float32)


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("width", [1, 5, 1536])
def test_silu_mul_matches_reference(rows, width) -> None:
    h = torch.randn(rows, 2 * width) * 4
    with torch.inference_mode():
        out = ops.silu_mul(h)
    assert out.shape == (rows, width)
    assert_close(out, ops.silu_mul_reference(h.double()), torch.float32)


def test_silu_mul_at_the_extremes_and_in_3d() -> None:
    g = torch.tensor([-1e4, -100.0, -88.0, -20.0, -1e-3, 0.0, 1e-3, 20.0, 88.0, 100.0, 1e4])
    h = torch.cat((g, torch.ones_like(g)))[None]
    with torch.inference_mode():
        out = ops.silu_mul(h)
    assert torch.isfinite(out).all()
    ref = F.silu(g.double())[None]
    assert torch.allclose(out.double(), ref, rtol=1e-6, atol=1e-30)
    h3 = torch.randn(2, 3, 10)
    with torch.inference_mode():
        assert_close(ops.silu_mul(h3), F.silu(h3[..., :5].double()) * h3[..., 5:],
                     torch.float32)


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("heads, head_dim", [(1, 2), (3, 8), (12, 64)])
@pytest.mark.parametrize("strided", [False, True])
def test_rope_matches_reference(rows, heads, head_dim, strided) -> None:
    cos, sin = ops.rope_cos_sin(head_dim, 512, 10000.0)
    positions = torch.randint(0, 512, (rows,))
    factors = ops.rope_at(positions, cos, sin)
    # strided: the heads are a slice of wider rows, as q and k are of the QKV output.
    wide = torch.randn(rows, heads + 2, head_dim) if strided else torch.randn(rows, heads, head_dim)
    x = wide[:, 1:heads + 1] if strided else wide
    with torch.inference_mode():
        out = ops.apply_rope(x, *factors)
    ref = ops.apply_rope_reference(x.double(), *(f.double() for f in factors))
    assert out.is_contiguous() and out.shape == x.shape
    assert_close(out, ref, torch.float32)


@pytest.mark.parametrize("strided", [False, True])
def test_store_kv_matches_reference(strided) -> None:
    num_blocks, block_size, kv_heads, head_dim, tokens = 5, 3, 2, 4, 7
    qkv = torch.randn(tokens, 3 * kv_heads, head_dim)
    k, v = (qkv[:, :kv_heads], qkv[:, kv_heads:2 * kv_heads]) if strided else (
        qkv[:, :kv_heads].clone(), qkv[:, kv_heads:2 * kv_heads].clone())
    slots = torch.tensor([14, -1, 0, 3, -1, 7, 1])
    caches = [torch.randn(num_blocks, block_size, kv_heads, head_dim) for _ in range(2)]
    ref = [c.clone() for c in caches]
    store_kv_cache_reference(k, v, *ref, slots)
    with torch.inference_mode():
        ops.store_kv_cache(k, v, *caches, slots)
    assert torch.equal(caches[0], ref[0]) and torch.equal(caches[1], ref[1])


def test_ops_pick_native_only_without_gradients() -> None:
    x = torch.randn(4, 8, requires_grad=True)
    w = torch.randn(8, requires_grad=True)
    choose = ops.registry().choose
    assert choose("rms_norm", x, w, 1e-5) == "reference"
    with torch.no_grad():
        assert choose("rms_norm", x, w, 1e-5) == "cpp"
        assert choose("rms_norm", x, w, 1e-5, residual=torch.zeros(4, 8)) == "cpp"
        assert choose("rms_norm", x.double(), w.double(), 1e-5) == "reference"
        assert choose("rms_norm", x, w[:7], 1e-5) == "reference"  # the reference's error
    # Training still gets gradients through every op.
    h = torch.randn(3, 10, requires_grad=True)
    ops.silu_mul(h).sum().backward()
    g = h.detach()[:, :5]
    dsilu = torch.sigmoid(g) * (1 + g * (1 - torch.sigmoid(g)))
    assert_close(h.grad[:, :5], dsilu * h.detach()[:, 5:], torch.float32, grad=True)
    y, r = ops.rms_norm(x, w, 1e-5, residual=torch.zeros(4, 8))
    (y.sum() + r.sum()).backward()
    assert x.grad is not None and w.grad is not None


def test_native_layer_ops_reject_bad_input() -> None:
    x, w, out = torch.randn(4, 8).numpy(), torch.randn(8).numpy(), torch.empty(4, 8).numpy()
    with pytest.raises(TypeError, match="x must be a C-contiguous float32 array.*float64"):
        _C.rms_norm(out, None, x.astype("float64"), None, w, 1e-5)
    with pytest.raises(ValueError, match="weight .* one entry per column"):
        _C.rms_norm(out, None, x, None, w[:7], 1e-5)
    with pytest.raises(ValueError, match="residual and residual_out must both"):
        _C.rms_norm(out, None, x, x, w, 1e-5)
    with pytest.raises(ValueError, match="out .* must match x"):
        _C.rms_norm(out[:3], None, x, None, w, 1e-5)
    with pytest.raises(ValueError, match="eps must be >= 0"):
        _C.rms_norm(out, None, x, None, w, -1.0)
    with pytest.raises(ValueError, match="num_threads must be >= 1"):
        _C.rms_norm(out, None, x, None, w, 1e-5, 0)
    with pytest.raises(ValueError, match=r"h .* must be \(rows, 2 \* width\)"):
        _C.silu_mul(torch.empty(4, 3).numpy(), torch.randn(4, 7).numpy())
    with pytest.raises(ValueError, match="even last dimension"):
        ops.silu_mul(torch.randn(4, 7))
    x3 = torch.randn(4, 2, 6)
    with pytest.raises(TypeError, match="contiguous within each row"):
        _C.rope(torch.empty(4, 2, 3).numpy(), x3[:, :, ::2].numpy(),
                torch.randn(4, 1, 3).numpy(), torch.randn(4, 1, 3).numpy())
    with pytest.raises(ValueError, match="head_dim even"):
        _C.rope(torch.empty(4, 2, 5).numpy(), torch.randn(4, 2, 5).numpy(),
                torch.randn(4, 1, 5).numpy(), torch.randn(4, 1, 5).numpy())
    with pytest.raises(ValueError, match="sin .* must match cos"):
        _C.rope(torch.empty(4, 2, 6).numpy(), x3.numpy(), torch.randn(4, 1, 6).numpy(),
                torch.randn(3, 1, 6).numpy())
    with pytest.raises(ValueError, match="out must not overlap x"):
        _C.rope(x3.numpy(), x3.numpy(), torch.randn(4, 1, 6).numpy(), torch.randn(4, 1, 6).numpy())
    cache = torch.zeros(2, 4, 2, 6)
    kv = torch.randn(3, 2, 6)
    for bad, at in (([0, 8, 1], 1), ([-2, 0, 1], 0)):
        with pytest.raises(ValueError, match=rf"slot_mapping\[{at}\] = -?\d+ is not a cache slot"):
            _C.store_kv(cache.numpy(), cache.clone().numpy(), kv.numpy(), kv.numpy(),
                        torch.tensor(bad).numpy())
    with pytest.raises(TypeError, match="slot_mapping must be a C-contiguous int64"):
        _C.store_kv(cache.numpy(), cache.clone().numpy(), kv.numpy(), kv.numpy(),
                    torch.tensor([0, 1, 2], dtype=torch.int32).numpy())
    with pytest.raises(ValueError, match="one slot_mapping entry per token"):
        _C.store_kv(cache.numpy(), cache.clone().numpy(), kv.numpy(), kv.numpy(),
                    torch.tensor([0, 1]).numpy())
    assert torch.equal(cache, torch.zeros_like(cache))  # nothing written on a rejected call
