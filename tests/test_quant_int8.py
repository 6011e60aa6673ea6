"""The C++ quantized matmul with int8 activations (``_C.quant_matmul(..., int8_activations=True)``):
each row of x rounded to int8 per 32-value block as llama.cpp does, then integer dot products;
with the blocks in GGUF's "rows" layout and in "rows8" (``llm_engine.quant.LAYOUTS``)."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from testing_utils import random_quant_blocks

from llm_engine import _C
from llm_engine.quant import LAYOUTS, QUANT_TYPES, QuantizedWeight

INT8_TYPES = [t for t in sorted(QUANT_TYPES) if _C.quant_matmul_int8_supported(t)]
_KS = {32: (32, 96, 576, 1536), 256: (256, 768)}


def _weight(qtype: str, rows: int, k: int, seed: int = 0, layout: str = "rows") -> QuantizedWeight:
    w = QuantizedWeight(qtype, torch.from_numpy(random_quant_blocks(qtype, rows, k, seed)), k)
    return w.to_layout(layout)


def _int8(x: torch.Tensor, w: QuantizedWeight, threads: int = 2) -> torch.Tensor:
    out = torch.empty(x.shape[0], w.out_features)
    _C.quant_matmul(out.numpy(), x.numpy(), w.blocks.numpy(), w.qtype, threads,
                    int8_activations=True, layout=w.layout)
    return out


def _rounded(x: torch.Tensor, block: int) -> tuple[np.ndarray, np.ndarray]:
    """llama.cpp's rounding of x's rows per block, modelled in numpy: levels (m, k) as
    float64 and scales (m, k / block) as float32 (d = max|x| / 127, ties away from zero)."""
    xb = x.numpy().reshape(x.shape[0], -1, block)
    d = (np.abs(xb).max(-1) / np.float32(127)).astype(np.float32)
    inv = np.where(d != 0, np.float32(1) / np.where(d != 0, d, 1), 0).astype(np.float32)
    v = (xb * inv[..., None]).astype(np.float64)  # the product in fp32, then exact
    q = np.sign(v) * np.floor(np.abs(v) + 0.5)
    return q.reshape(x.shape), d


@pytest.mark.parametrize("qtype", INT8_TYPES)
@pytest.mark.parametrize("rows", [1, 3, 32, 257])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_int8_matmul_is_within_the_rounding_bound_of_the_reference(qtype, rows, layout):
    """Rounding moves each x value by at most d_x / 2 (d_x = its block's max|x| / 127),
    so an output moves by at most sum |W| * d_x / 2, plus fp32 rounding of the sums."""
    block = QUANT_TYPES[qtype][0]
    for k in _KS[block]:
        w = _weight(qtype, 37, k, seed=k, layout=layout)
        x = torch.randn(rows, k) * torch.rand(rows, k // block, 1).repeat_interleave(block, 1)[..., 0]
        got = _int8(x, w).double()
        wd = w.dequantize().double()
        ref = x.double() @ wd.T
        _, d = _rounded(x, block)
        half_step = torch.from_numpy(d).double().repeat_interleave(block, 1) / 2
        bound = half_step @ wd.abs().T + 1e-5 * (x.double().abs() @ wd.abs().T)
        assert ((got - ref).abs() <= bound).all(), (qtype, rows, k)
        assert ((got - ref).norm() / ref.norm()).item() < 2e-2, (qtype, rows, k)


@pytest.mark.parametrize("qtype", INT8_TYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_int8_matmul_equals_its_fp64_model_to_fp32_rounding(qtype, layout):
    """Against the same rounding of x (ties included) computed in numpy, then fp64 sums."""
    block = QUANT_TYPES[qtype][0]
    k, rows = 4 * block, 5
    w = _weight(qtype, 23, k, seed=3, layout=layout)
    x = torch.randn(rows, k)
    x[0, :block] = torch.arange(block) - 15.5  # max 16.5 -> levels at half steps: ties
    x[1, :block] = 0.0  # an all-zero block: scale 0
    q, d = _rounded(x, block)
    xr = torch.from_numpy(q * d.astype(np.float64).repeat(block, 1))
    model = xr @ w.dequantize().double().T
    got = _int8(x, w).double()
    scale = xr.abs() @ w.dequantize().double().abs().T
    assert ((got - model).abs() <= 1e-5 * scale + 1e-30).all()


@pytest.mark.parametrize("qtype", INT8_TYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_int8_matmul_is_exact_when_x_needs_no_rounding(qtype, layout):
    """x = integers in [-127, 127] (each block reaching 127) times a power of two per
    block: rounding changes nothing, so only fp32 rounding of the sums is left."""
    block = QUANT_TYPES[qtype][0]
    k, rows = 3 * block, 4
    gen = torch.Generator().manual_seed(5)
    q = torch.randint(-127, 128, (rows, k // block, block), generator=gen).double()
    q[..., 7] = 127.0 * torch.where(torch.rand(rows, k // block, generator=gen) < 0.5, -1.0, 1.0)
    scale = 2.0 ** torch.randint(-12, 2, (rows, k // block, 1), generator=gen).double()
    x = (q * scale).reshape(rows, k).float()
    w = _weight(qtype, 19, k, seed=6, layout=layout)
    wd = w.dequantize().double()
    ref = x.double() @ wd.T
    got = _int8(x, w).double()
    assert ((got - ref).abs() <= 1e-6 * (x.double().abs() @ wd.abs().T)).all()


@pytest.mark.parametrize("qtype", INT8_TYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_int8_matmul_rows_do_not_depend_on_the_batch(qtype, layout):
    k = 2 * QUANT_TYPES[qtype][0]
    w = _weight(qtype, 10, k, layout=layout)  # 10 weight rows: tiles of 4 and a remainder
    x = torch.randn(7, k)
    many = _int8(x, w)
    for i in range(7):
        assert torch.equal(_int8(x[i:i + 1].clone(), w), many[i:i + 1]), i
    assert torch.equal(_int8(x[2:5].clone(), w, threads=1), many[2:5])


@pytest.mark.parametrize("layout", LAYOUTS)
def test_int8_matmul_gives_nan_for_a_row_with_a_non_finite_value(layout):
    w = _weight("q4_1", 11, 64, layout=layout)
    x = torch.randn(3, 64)
    x[1, 40] = float("inf")
    got = _int8(x, w)
    assert got.shape == (3, 11)
    assert got[1].isnan().all() and got[[0, 2]].isfinite().all()


def test_int8_generic_path_equals_the_avx2_path_bit_for_bit(tmp_path):
    """LLM_ENGINE_QUANT_GENERIC forces the plain C++ path (read once per process), so
    each path runs in a child process on the same saved inputs: int8 activations in both
    layouts, and the fp32 ones of the rows8 kernels (which mirror their AVX2 path too)."""
    cases = {}
    for i, (qtype, k) in enumerate([("q8_0", 96), ("q4_0", 576), ("q4_1", 160)]):
        for m in (1, 6):
            for layout in LAYOUTS:
                w = _weight(qtype, 11 if layout == "rows" else 21, k, seed=i, layout=layout)
                cases[f"{qtype}_{m}_{layout}_w"] = w.blocks.numpy()
                cases[f"{qtype}_{m}_{layout}_x"] = np.random.default_rng(m + i).normal(
                    size=(m, k)).astype(np.float32)
    np.savez(tmp_path / "in.npz", **cases)
    script = (
        "import sys, numpy as np\n"
        "from llm_engine import _C\n"
        "cases, outs = np.load(sys.argv[1]), {}\n"
        "for name in cases.files:\n"
        "    if name.endswith('_x'):\n"
        "        x, w = cases[name], cases[name[:-1] + 'w']\n"
        "        a, b, _, layout, _ = name.split('_')\n"
        "        for int8 in (True, False) if layout == 'rows8' else (True,):\n"
        "            out = outs[name + str(int8)] = np.empty((x.shape[0], w.shape[0]), np.float32)\n"
        "            _C.quant_matmul(out, x, w, a + '_' + b, 2, int8_activations=int8, layout=layout)\n"
        "np.savez(sys.argv[2], **outs)\n")
    env = dict(os.environ)
    env.pop("LLM_ENGINE_QUANT_GENERIC", None)
    results = []
    for generic in (False, True):
        if generic:
            env["LLM_ENGINE_QUANT_GENERIC"] = "1"
        path = tmp_path / f"out{int(generic)}.npz"
        subprocess.run([sys.executable, "-c", script, str(tmp_path / "in.npz"), str(path)],
                       env=env, check=True)
        results.append(np.load(path))
    fast, generic = results
    assert len(fast.files) == 18
    for name in fast.files:
        assert np.array_equal(fast[name].view(np.uint32), generic[name].view(np.uint32)), name


@pytest.mark.parametrize("layout", LAYOUTS)
def test_int8_matmul_writes_a_column_slice_of_a_wider_output(layout):
    w = _weight("q4_1", 13, 64, layout=layout)
    x = torch.randn(3, 64)
    out = torch.zeros(3, 17)
    _C.quant_matmul(out[:, 2:15].numpy(), x.numpy(), w.blocks.numpy(), "q4_1", 1,
                    int8_activations=True, layout=layout)
    assert torch.equal(out[:, 2:15], _int8(x, w))
    assert not out[:, :2].any() and not out[:, 15:].any()


def test_int8_matmul_rejects_bad_input_clearly():
    w = _weight("q8_0", 4, 64)
    out = torch.empty(2, 4)
    with pytest.raises(ValueError, match="multiple of the q8_0 block size 32, got 40"):
        _C.quant_matmul(out.numpy(), torch.randn(2, 40).numpy(), w.blocks.numpy(), "q8_0",
                        int8_activations=True)
    unsupported = [t for t in sorted(QUANT_TYPES) if t not in INT8_TYPES]
    for qtype in unsupported:
        wk = _weight(qtype, 4, 256)
        with pytest.raises(ValueError, match=f"int8_activations=True does not take {qtype}"):
            _C.quant_matmul(out.numpy(), torch.randn(2, 256).numpy(), wk.blocks.numpy(), qtype,
                            int8_activations=True)
    with pytest.raises(ValueError, match="qtype must be one of"):
        _C.quant_matmul_int8_supported("q3_k")
    assert {"q8_0", "q4_0", "q4_1"} <= set(INT8_TYPES)


def test_int8_rounded_is_the_kernels_rounding():
    from llm_engine.ops.quantized import int8_rounded

    x = torch.randn(3, 96)
    x[0, :32] = torch.arange(32) - 15.5  # ties
    x[1, 32:64] = 0.0
    q, d = _rounded(x, 32)
    assert torch.equal(int8_rounded(x).double(),
                       torch.from_numpy(q * d.astype(np.float64).repeat(32, 1)).float().double())
    with pytest.raises(ValueError, match="multiple of 32, got 40"):
        int8_rounded(torch.randn(2, 40))



def test_ops_take_int8_only_when_forced_and_then_for_every_row_count():
    from llm_engine import ops

    reg = ops.registry()
    w41, w6k = _weight("q4_1", 8, 256), _weight("q6_k", 8, 256)
    few, many = torch.randn(3, 256), torch.randn(ops.QUANT_GEMM_MIN_ROWS + 1, 256)
    bias = torch.randn(8)
    with torch.no_grad():
        assert reg.choose("quantized_linear", few, w41) == "cpp"
        assert reg.eligible("quantized_linear", few, w41)["int8"] is None
        assert "q4_0/q4_1/q8_0" in reg.eligible("quantized_linear", few, w6k)["int8"]
        with ops.use(quantized_linear="int8"):
            assert reg.choose("quantized_linear", many, w41) == "int8"
            got = ops.quantized_linear(many, w41, bias)
            assert torch.equal(got[:3], ops.quantized_linear(many[:3].clone(), w41, bias))
            with pytest.raises(ValueError, match="q4_0/q4_1/q8_0"):
                ops.quantized_linear(few, w6k)
        threads = torch.get_num_threads()
        assert torch.equal(got, _int8(many, w41, threads=threads) + bias)
