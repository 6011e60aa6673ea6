"""Quantized weights: reference dequantizers/quantizers against the ``gguf`` package."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

from llm_engine.quant import QUANT_TYPES, QUANTIZE_TO, QuantizedWeight, dequantize, quantize

# Byte offsets of each type's fp16 scales inside a block (random bytes there could be inf/NaN).
_F16_AT = {"q8_0": [0], "q4_0": [0], "q4_1": [0, 2], "q4_k": [0, 2], "q5_k": [0, 2], "q6_k": [208]}


def random_blocks(qtype: str, rows: int, in_features: int, seed: int = 0) -> np.ndarray:
    """Random but valid ``(rows, row_bytes)`` uint8 blocks of ``qtype``."""
    rng = np.random.default_rng(seed)
    block, size = QUANT_TYPES[qtype]
    b = rng.integers(0, 256, size=(rows * in_features // block, size), dtype=np.uint8)
    for at in _F16_AT[qtype]:
        scales = np.float16(rng.normal(size=b.shape[0]) * 0.02)
        b[:, at:at + 2] = scales.view(np.uint8).reshape(-1, 2)
    return b.reshape(rows, -1)


@pytest.mark.parametrize("qtype", sorted(QUANT_TYPES))
def test_dequantize_equals_gguf_bit_for_bit(qtype):
    block = QUANT_TYPES[qtype][0]
    blocks = random_blocks(qtype, 7, block * 3)
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
