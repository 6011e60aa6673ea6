"""The Triton weight-only GEMM (kernels/quant_matmul.py) against its reference."""

import pytest
import torch
from llm_engine.kernels.quant_matmul import (
    dequantize_reference,
    pack_int4,
    quant_matmul,
    quant_matmul_reference,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _weights(bits: int, n: int, k: int, group: int, dtype: torch.dtype):
    if bits == 8:
        q = torch.randint(-127, 128, (n, k), dtype=torch.int8)
    else:
        q = pack_int4(torch.randint(0, 16, (n, k), dtype=torch.uint8))
    scales = (torch.rand(n, k // group) * 0.02 + 0.001).to(dtype)
    offsets = (torch.randn(n, k // group) * 0.05).to(dtype)
    return q.to(DEVICE), scales.to(DEVICE), offsets.to(DEVICE)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("m,n,k,split_k", [(1, 37, 128, 1), (3, 20, 192, 3), (17, 33, 64, 2)])
def test_quant_matmul_matches_reference_on_odd_shapes(bits, dtype, m, n, k, split_k):
    q, s, o = _weights(bits, n, k, 32, dtype)
    x = torch.randn(m, k, device=DEVICE).to(dtype)
    got = quant_matmul(x, q, s, o, bits, 32, split_k=split_k)
    ref = quant_matmul_reference(x.float(), q, s, o, bits, 32).double()
    assert got.shape == (m, n) and got.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert ((got.double() - ref).norm() / ref.norm()).item() < tol


def test_int4_layout_holds_both_halves_of_a_row():
    q = torch.arange(8, dtype=torch.uint8).reshape(1, 8)
    w = dequantize_reference(pack_int4(q), torch.ones(1, 1), torch.zeros(1, 1), 4, 8)
    assert w.tolist() == [[0, 1, 2, 3, 4, 5, 6, 7]]


def test_quant_matmul_rejects_bad_input_clearly():
    q, s, o = _weights(4, 8, 64, 32, torch.float32)
    x = torch.randn(2, 64, device=DEVICE)
    with pytest.raises(ValueError, match="group_size must be a positive divisor of K=64"):
        quant_matmul(x, q, s, o, 4, 48)
    with pytest.raises(ValueError, match=r"qweight must be \(N, 64\)"):
        quant_matmul(x, q.view(torch.int8), s, o, 8, 32)
    with pytest.raises(ValueError, match=r"scales must be \(N, K // group_size\)"):
        quant_matmul(x, q, s[:, :1], o, 4, 32)
    with pytest.raises(ValueError, match="bits must be 4 or 8"):
        quant_matmul(x, q, s, o, 3, 32)


# --------------------------------------------------------- GGUF weights through ops.quantized_linear
@pytest.mark.parametrize("qtype", ["q8_0", "q4_0", "q4_1"])
def test_group_layout_is_the_gguf_dequantization_exactly(qtype):
    from llm_engine.ops.quantized import group_layout
    from llm_engine.quant import quantize

    w = quantize(torch.randn(7, 96) * 0.1, qtype)
    qweight, scales, offsets, bits = group_layout(w)
    assert torch.equal(dequantize_reference(qweight, scales, offsets, bits, 32), w.dequantize())
    assert group_layout(w)[0] is qweight  # made once, kept with the weight
    rows8 = w.to_layout("rows8")
    got = group_layout(rows8)[:3]
    assert all(torch.equal(a, b) for a, b in zip(got, (qweight, scales, offsets), strict=True))


@pytest.mark.parametrize("qtype", ["q8_0", "q4_0", "q4_1"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("rows", [1, 3, 33])
def test_triton_quantized_linear_matches_the_reference(qtype, dtype, rows):
    from llm_engine import ops
    from llm_engine.quant import QuantizedWeight, quantize

    cpu = quantize(torch.randn(45, 64) * 0.1, qtype)
    w = QuantizedWeight(qtype, cpu.blocks.to(DEVICE), 64)
    x = torch.randn(rows, 64, device=DEVICE).to(dtype)
    bias = torch.randn(45, device=DEVICE).to(dtype)
    with torch.inference_mode():
        assert ops.registry().eligible("quantized_linear", x, w, bias)["triton"] is None
        with ops.use(quantized_linear="triton"):
            got = ops.quantized_linear(x, w, bias)
        ref = ops.quantized_linear_reference(x.double(), w, bias.double())
    assert got.shape == (rows, 45) and got.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    assert ((got.double() - ref).norm() / ref.norm()).item() < tol


def test_triton_quantized_linear_refuses_k_quants():
    from llm_engine import ops
    from llm_engine.quant import QuantizedWeight

    w = QuantizedWeight("q6_k", torch.zeros(2, 210, dtype=torch.uint8, device=DEVICE), 256)
    why = ops.registry().eligible("quantized_linear", torch.randn(1, 256, device=DEVICE), w)
    assert "q8_0/q4_0/q4_1" in why["triton"]
