"""Quantized weights: reference dequantizers/quantizers against the ``gguf`` package."""

import numpy as np
import pytest
import torch

pytest.importorskip("gguf", reason="the dequantizers are checked against the gguf package")

from gguf import GGMLQuantizationType  # noqa: E402
from gguf.quants import dequantize as gguf_dequantize  # noqa: E402
from gguf.quants import quantize as gguf_quantize  # noqa: E402
from testing_utils import random_quant_blocks  # noqa: E402

from llm_engine import _C, ops
from llm_engine.config import ModelConfig
from llm_engine.model import AttentionMetadata, QuantizedLinear, Transformer
from llm_engine.quant import (
    QUANT_TYPES,
    QUANTIZE_TO,
    QuantizedWeight,
    dequantize,
    quantize,
)


@pytest.mark.parametrize("qtype", sorted(QUANT_TYPES))
def test_dequantize_equals_gguf_bit_for_bit(qtype):
    block = QUANT_TYPES[qtype][0]
    blocks = random_quant_blocks(qtype, 7, block * 3)
    ref = gguf_dequantize(blocks, GGMLQuantizationType[qtype.upper()])
    ours = dequantize(torch.from_numpy(blocks), qtype, block * 3).numpy()
    assert ours.shape == ref.shape and ours.dtype == np.float32
    assert np.array_equal(ours.view(np.uint32), ref.view(np.uint32))


@pytest.mark.parametrize("qtype", QUANTIZE_TO)
def test_quantize_equals_gguf_bytes(qtype):
    w = np.random.default_rng(1).normal(size=(5, 96)).astype(np.float32)
    w[0, :32] = 0.0  # an all-zero block has scale 0
    w[1, 32:64] = 3.0  # a constant block
    ours = quantize(torch.from_numpy(w), qtype)
    assert np.array_equal(ours.blocks.numpy(), gguf_quantize(w, GGMLQuantizationType[qtype.upper()]))
    assert torch.allclose(ours.dequantize(), torch.from_numpy(w), atol=0.5)


def test_in_features_not_a_block_multiple_is_a_clear_error():
    with pytest.raises(ValueError, match="multiple of the q4_k block size 256"):
        dequantize(torch.zeros(2, 144, dtype=torch.uint8), "q4_k", 200)
    with pytest.raises(ValueError, match="multiple of the q8_0 block size 32"):
        quantize(torch.zeros(3, 40), "q8_0")


def test_quantized_weight_checks_its_blocks():
    with pytest.raises(ValueError, match="qtype must be one of"):
        QuantizedWeight("q3_k", torch.zeros(2, 110, dtype=torch.uint8), 256)
    with pytest.raises(TypeError, match="uint8"):
        QuantizedWeight("q8_0", torch.zeros(2, 34), 32)
    with pytest.raises(ValueError, match=r"\(out_features, 68\)"):
        QuantizedWeight("q8_0", torch.zeros(2, 34, dtype=torch.uint8), 64)
    with pytest.raises(ValueError, match="must be one of"):
        quantize(torch.zeros(2, 256), "q6_k")


# ------------------------------------------------------------------------ C++ kernels
def _weight(qtype: str, rows: int, in_features: int, seed: int = 0) -> QuantizedWeight:
    return QuantizedWeight(qtype, torch.from_numpy(random_quant_blocks(qtype, rows, in_features, seed)),
                           in_features)


def _reference(x: torch.Tensor, w: QuantizedWeight) -> torch.Tensor:
    return x.double() @ w.dequantize().double().T


def _rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.double() - ref).norm() / ref.norm()).item()


# Every K the kernels see in SmolLM2 (576, 1536) and odd multiples of each block size.
_KS = {32: (32, 96, 576, 1536), 256: (256, 768, 1536)}


@pytest.mark.parametrize("qtype", sorted(QUANT_TYPES))
def test_cpu_dequantize_equals_reference(qtype):
    for k in _KS[QUANT_TYPES[qtype][0]]:
        w = _weight(qtype, 13, k)
        out = torch.empty(13, k)
        _C.quant_dequantize(out.numpy(), w.blocks.numpy(), qtype, 2)
        assert torch.equal(out, w.dequantize())


@pytest.mark.parametrize("qtype", sorted(QUANT_TYPES))
@pytest.mark.parametrize("rows", [1, 3, 32, 257])
def test_cpu_quant_matmul_matches_reference(qtype, rows):
    for k in _KS[QUANT_TYPES[qtype][0]]:
        w = _weight(qtype, 37, k, seed=k)
        x = torch.randn(rows, k)
        out = torch.empty(rows, 37)
        _C.quant_matmul(out.numpy(), x.numpy(), w.blocks.numpy(), qtype, 2)
        assert _rel(out, _reference(x, w)) < 1e-5, (qtype, rows, k)


def test_cpu_quant_matmul_writes_a_column_slice_of_a_wider_output():
    w = _weight("q4_1", 5, 64)
    x = torch.randn(3, 64)
    out = torch.zeros(3, 9)
    _C.quant_matmul(out[:, 2:7].numpy(), x.numpy(), w.blocks.numpy(), "q4_1", 1)
    assert _rel(out[:, 2:7], _reference(x, w)) < 1e-5
    assert not out[:, :2].any() and not out[:, 7:].any()


def test_cpu_quant_matmul_rejects_bad_input_clearly():
    w = _weight("q8_0", 4, 64)
    x, out = torch.randn(2, 64), torch.empty(2, 4)
    with pytest.raises(ValueError, match="multiple of the q8_0 block size 32, got 40"):
        _C.quant_matmul(out.numpy(), torch.randn(2, 40).numpy(), w.blocks.numpy(), "q8_0")
    with pytest.raises(ValueError, match=r"blocks \(4, 68\) must be \(rows, 40\) for q4_1"):
        _C.quant_matmul(out.numpy(), x.numpy(), w.blocks.numpy(), "q4_1")
    with pytest.raises(ValueError, match="qtype must be one of"):
        _C.quant_matmul(out.numpy(), x.numpy(), w.blocks.numpy(), "q3_k")
    with pytest.raises(ValueError, match=r"out \(2, 3\) must be"):
        _C.quant_matmul(torch.empty(2, 3).numpy(), x.numpy(), w.blocks.numpy(), "q8_0")
    with pytest.raises(TypeError, match="x must be a C-contiguous float32"):
        _C.quant_matmul(out.numpy(), x.double().numpy(), w.blocks.numpy(), "q8_0")
    with pytest.raises(TypeError, match="blocks must be a C-contiguous uint8"):
        _C.quant_matmul(out.numpy(), x.numpy(), w.blocks.numpy().view(np.int8), "q8_0")
    with pytest.raises(ValueError, match="must not overlap x"):
        _C.quant_matmul(x[:, :4].numpy(), x.numpy(), w.blocks.numpy(), "q8_0")
    with pytest.raises(ValueError, match=r"one row per row of blocks"):
        _C.quant_dequantize(torch.empty(3, 64).numpy(), w.blocks.numpy(), "q8_0")


# ------------------------------------------------------------------------ ops and model
@pytest.mark.parametrize("qtype", ["q4_1", "q6_k"])
def test_ops_linear_rows_do_not_depend_on_the_batch(qtype):
    """The GEMM route (many rows) and the kernel (few rows) give a row the same numbers."""
    k = 512
    w = _weight(qtype, 40, k)
    bias = torch.randn(40)
    x = torch.randn(ops.QUANT_GEMM_MIN_ROWS + 3, k)
    with torch.no_grad():
        many = ops.linear(x, w, bias)
        few = torch.cat([ops.linear(x[i:i + 3], w, bias) for i in range(0, x.shape[0], 3)])
    assert many.shape == (x.shape[0], 40)
    assert ((many - few).abs().max() / many.abs().max()).item() < 1e-5
    ref = _reference(x, w) + bias.double()
    assert _rel(many, ref) < 1e-5
    assert _rel(ops.quantized_linear_reference(x, w, bias), x.double() @ w.dequantize().double().T
                + bias.double()) < 1e-6


def test_ops_linear_on_a_quantized_weight_checks_x():
    with pytest.raises(ValueError, match=r"x must be \(\.\.\., 64\)"):
        ops.linear(torch.randn(2, 32), _weight("q8_0", 4, 64))


def test_quantized_model_generates_like_its_fp32_self():
    """A tiny Llama quantized to Q8_0 at load keeps its greedy choices on most positions."""
    torch.manual_seed(0)
    cfg = ModelConfig(arch="llama", vocab_size=96, hidden_size=64, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=16, intermediate_size=96,
                      max_position_embeddings=64)
    model = Transformer(cfg).eval()
    ids = torch.randint(0, 96, (40,))
    attn = AttentionMetadata.for_lengths([40], "cpu")
    with torch.no_grad():
        ref = model.compute_logits(model(ids, torch.arange(40), attn))
        model.quantize("q8_0")
        assert model.quantized and isinstance(model.layers[0].mlp.up_proj, QuantizedLinear)
        assert not any(p.dtype == torch.float32 and p.dim() == 2 for p in model.parameters())
        got = model.compute_logits(model(ids, torch.arange(40), attn))
    assert _rel(got, ref.double()) < 2e-2
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9
    with pytest.raises(TypeError, match="quantized"):
        _ = model.lm_head_weight
