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
    LAYOUTS,
    QUANT_TYPES,
    QUANTIZE_TO,
    ROWS8_TYPES,
    QuantizedWeight,
    dequantize,
    quantize,
    relayout,
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
    with pytest.raises(ValueError, match="layout must be one of"):
        QuantizedWeight("q8_0", torch.zeros(2, 34, dtype=torch.uint8), 32, "cols")
    with pytest.raises(ValueError, match="layout 'rows8' takes qtype q8_0/q4_0/q4_1, got 'q6_k'"):
        QuantizedWeight("q6_k", torch.zeros(2, 210, dtype=torch.uint8), 256, "rows8")


# ------------------------------------------------------------------------ C++ kernels
def _weight(qtype: str, rows: int, in_features: int, seed: int = 0,
            layout: str = "rows") -> QuantizedWeight:
    w = QuantizedWeight(qtype, torch.from_numpy(random_quant_blocks(qtype, rows, in_features, seed)),
                        in_features)
    return w.to_layout(layout)


# The (qtype, layout) pairs: every type in GGUF's rows, the 32-value types in rows8 too.
_TYPE_LAYOUTS = [(q, "rows") for q in sorted(QUANT_TYPES)] + [(q, "rows8") for q in ROWS8_TYPES]


def _reference(x: torch.Tensor, w: QuantizedWeight) -> torch.Tensor:
    return x.double() @ w.dequantize().double().T


def _rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.double() - ref).norm() / ref.norm()).item()


# Every K the kernels see in SmolLM2 (576, 1536) and odd multiples of each block size.
_KS = {32: (32, 96, 576, 1536), 256: (256, 768, 1536)}


@pytest.mark.parametrize("qtype, layout", _TYPE_LAYOUTS)
def test_cpu_dequantize_equals_reference(qtype, layout):
    for k in _KS[QUANT_TYPES[qtype][0]]:
        w = _weight(qtype, 13, k, layout=layout)
        out = torch.empty(13, k)
        _C.quant_dequantize(out.numpy(), w.blocks.numpy(), qtype, 2, layout=layout)
        assert torch.equal(out, _weight(qtype, 13, k).dequantize())
        assert torch.equal(out, w.dequantize())


@pytest.mark.parametrize("qtype, layout", _TYPE_LAYOUTS)
@pytest.mark.parametrize("rows", [1, 3, 32, 257])
def test_cpu_quant_matmul_matches_reference(qtype, layout, rows):
    for k in _KS[QUANT_TYPES[qtype][0]]:
        w = _weight(qtype, 37, k, seed=k, layout=layout)
        x = torch.randn(rows, k)
        out = torch.empty(rows, 37)
        _C.quant_matmul(out.numpy(), x.numpy(), w.blocks.numpy(), qtype, 2, layout=layout)
        assert _rel(out, _reference(x, w)) < 1e-5, (qtype, rows, k)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_cpu_quant_matmul_writes_a_column_slice_of_a_wider_output(layout):
    w = _weight("q4_1", 13, 64, layout=layout)
    x = torch.randn(3, 64)
    out = torch.zeros(3, 17)
    _C.quant_matmul(out[:, 2:15].numpy(), x.numpy(), w.blocks.numpy(), "q4_1", 1, layout=layout)
    assert _rel(out[:, 2:15], _reference(x, w)) < 1e-5
    assert not out[:, :2].any() and not out[:, 15:].any()


@pytest.mark.parametrize("qtype", ROWS8_TYPES)
@pytest.mark.parametrize("rows", [1, 3, 8, 32, 257])
def test_rows8_relayout_is_a_permutation_of_the_rows_bytes(qtype, rows):
    """The C++ relayout equals the reference, goes back exactly, moves whole 8-row groups
    (slices of whole groups are rows8 of their own rows) and leaves the last rows % 8."""
    k = 96
    w = _weight(qtype, rows, k, seed=rows)
    r8 = torch.empty_like(w.blocks)
    _C.quant_relayout(r8.numpy(), w.blocks.numpy(), qtype, k, True)
    assert torch.equal(r8, relayout(w.blocks, qtype, k, to_rows8=True))
    assert torch.equal(r8, w.to_layout("rows8").blocks)
    back = torch.empty_like(r8)
    _C.quant_relayout(back.numpy(), r8.numpy(), qtype, k, False)
    assert torch.equal(back, w.blocks) and torch.equal(relayout(r8, qtype, k, False), w.blocks)
    assert torch.equal(r8.flatten().sort().values, w.blocks.flatten().sort().values)
    whole = rows // 8 * 8
    assert torch.equal(r8[whole:], w.blocks[whole:])
    if whole >= 16:
        assert torch.equal(r8[8:16], relayout(w.blocks[8:16], qtype, k, to_rows8=True))


def test_rows8_layout_rejects_bad_input_clearly():
    w = _weight("q4_1", 9, 64)
    x, out = torch.randn(2, 64), torch.empty(2, 9)
    with pytest.raises(ValueError, match="layout must be 'rows' or 'rows8', got 'cols'"):
        _C.quant_matmul(out.numpy(), x.numpy(), w.blocks.numpy(), "q4_1", layout="cols")
    wk = _weight("q4_k", 9, 256)
    with pytest.raises(ValueError, match="layout 'rows8' takes q8_0, q4_0 and q4_1 blocks, got q4_k"):
        _C.quant_dequantize(torch.empty(9, 256).numpy(), wk.blocks.numpy(), "q4_k", layout="rows8")
    with pytest.raises(ValueError, match="takes q8_0, q4_0 and q4_1"):
        _C.quant_relayout(torch.empty_like(wk.blocks).numpy(), wk.blocks.numpy(), "q4_k", 256, True)
    with pytest.raises(ValueError, match="must not overlap blocks"):
        _C.quant_relayout(w.blocks.numpy(), w.blocks.numpy(), "q4_1", 64, True)
    with pytest.raises(ValueError, match=r"out \(9, 20\) must match blocks \(9, 40\)"):
        _C.quant_relayout(torch.empty(9, 20, dtype=torch.uint8).numpy(), w.blocks.numpy(),
                          "q4_1", 64, True)
    with pytest.raises(ValueError, match="takes qtype q8_0/q4_0/q4_1"):
        relayout(wk.blocks, "q4_k", 256, to_rows8=True)


def test_quantized_linear_keeps_rows_in_its_state_dict_whatever_its_layout():
    layer = QuantizedLinear([quantize(torch.randn(20, 64), "q4_1"),
                             quantize(torch.randn(12, 64), "q8_0")])
    x = torch.randn(5, 64)
    with torch.no_grad():
        before = layer(x)
        rows_state = {k: v.clone() for k, v in layer.state_dict().items()}
        layer.set_layout("rows8")
        assert [p.layout for p in layer.parts] == ["rows8", "rows8"]
        assert layer.blocks0 is layer.parts[0].blocks
        assert not torch.equal(layer.blocks0, rows_state["blocks0"])
        assert torch.allclose(layer(x), before, rtol=1e-5, atol=1e-5)
        assert all(torch.equal(v, rows_state[k]) for k, v in layer.state_dict().items())
        layer.set_layout("rows")
        assert torch.equal(layer.blocks0, rows_state["blocks0"])


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


def test_quantized_embedding_looks_rows_up_in_either_layout():
    """21 rows: two groups of 8 and 5 rows left in GGUF's layout."""
    from llm_engine.model import QuantizedEmbedding

    emb = QuantizedEmbedding(quantize(torch.randn(21, 64), "q8_0"))
    ids = torch.tensor([[0, 7, 8, 15], [16, 20, 3, 16]])
    x = torch.randn(3, 64)
    with torch.no_grad():
        rows, logits = emb(ids), emb.linear(x)
        assert torch.equal(rows, emb.qweight.dequantize()[ids])
        emb.set_layout("rows8")
        assert emb.qweight.layout == "rows8" and emb.blocks0 is emb.qweight.blocks
        assert torch.equal(emb(ids), rows)
        assert torch.allclose(emb.linear(x), logits, rtol=1e-5, atol=1e-5)


def test_decode_logits_take_the_activations_of_the_decode_projections():
    """A decode step's quantized LM head rounds x to int8 as its layers do, unless another
    quantized_linear is forced; a prefill's keeps fp32."""
    from llm_engine.ops.quantized import int8_rounded

    torch.manual_seed(0)
    cfg = ModelConfig(arch="llama", vocab_size=96, hidden_size=64, num_layers=1, num_heads=4,
                      num_kv_heads=2, head_dim=16, intermediate_size=96, tie_word_embeddings=True)
    model = Transformer(cfg).eval()
    model.quantize("q8_0")
    hidden = torch.randn(3, 64)
    w = model.embed_tokens.qweight
    with torch.no_grad():
        decode, prefill = model.compute_logits(hidden, decode=True), model.compute_logits(hidden)
        with ops.use(quantized_linear="cpp"):
            forced = model.compute_logits(hidden, decode=True)
    ref = int8_rounded(hidden).double() @ w.dequantize().double().T
    assert _rel(decode, ref) < 1e-5
    assert torch.equal(forced, prefill) and _rel(prefill, _reference(hidden, w)) < 1e-5
    assert not torch.equal(decode, prefill)


def test_the_conversion_cache_reads_each_parts_layout_and_older_entries(tmp_path):
    """Parts saved with a layout load in it; an entry without one (CACHE_FORMAT 2) is
    GGUF's rows."""
    import json

    from safetensors.torch import save_file

    from llm_engine.loader import QUANT_METADATA, _load_converted

    w = quantize(torch.randn(20, 64), "q4_1")
    path = str(tmp_path / "model.safetensors")
    meta = {"a": [["q4_1", 64, "rows8"]], "b": [["q4_1", 64]]}
    save_file({"a.qblocks0": w.to_layout("rows8").blocks, "b.qblocks0": w.blocks}, path,
              metadata={QUANT_METADATA: json.dumps(meta)})
    _, cached = _load_converted(path)
    assert cached["a"][0].layout == "rows8" and cached["b"][0].layout == "rows"
    assert torch.equal(cached["a"][0].dequantize(), w.dequantize())
    assert torch.equal(cached["b"][0].dequantize(), w.dequantize())
