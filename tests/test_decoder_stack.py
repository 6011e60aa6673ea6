"""``ops.decode_layers``: a decode step through every layer in one C++ call
(``_C.DecoderStack``) against the per-op path, on odd shapes, ragged contexts, mixed
quantization types, q/k norms, biases and sliding windows; its input checks; and the
engine generating the same tokens with and without it."""

from __future__ import annotations

import pytest
import torch
from test_engine import PROMPTS, make_llm, random_llama, tokenizer  # noqa: F401
from testing_utils import random_quant_blocks

from llm_engine import _C, SamplingParams, ops
from llm_engine.config import ModelConfig
from llm_engine.model import Transformer
from llm_engine.quant import QUANTIZE_TO, ROWS8_TYPES, QuantizedWeight, quantize

pytestmark = pytest.mark.usefixtures("one_cpu_thread")


def _proj(gen: torch.Generator, out: int, k: int, qtypes: tuple[str, ...],
          layout: str = "rows") -> list:
    """``out`` rows of ``k`` inputs, split evenly into one part per qtype (random valid
    blocks for the K-quants, which we do not quantize to), the parts whose type has
    ``layout`` in it."""
    rows = [out // len(qtypes)] * len(qtypes)
    rows[-1] += out - sum(rows)
    seed = int(torch.randint(1 << 30, (1,), generator=gen))
    parts = [quantize(torch.randn(r, k, generator=gen) * 0.2, q) if q in QUANTIZE_TO else
             QuantizedWeight(q, torch.from_numpy(random_quant_blocks(q, r, k, seed)), k)
             for r, q in zip(rows, qtypes, strict=True)]
    return [p.to_layout(layout) if p.qtype in ROWS8_TYPES else p for p in parts]


def make_stack(seed: int = 0, *, hidden: int = 96, heads: int = 3, kv_heads: int = 1,
               head_dim: int = 32, inter: int = 160, layers: int = 3, bias: bool = False,
               qk_norm: bool = False, windows: tuple = (None, 5, None),
               qtypes: tuple = (("q4_1", "q8_0"), ("q4_0",), ("q8_0",), ("q4_1",)),
               blocks: int = 24, block_size: int = 4, layout: str = "rows") -> ops.DecoderStack:
    gen = torch.Generator().manual_seed(seed)
    qkv_out = (heads + 2 * kv_heads) * head_dim

    def vec(n: int) -> torch.Tensor:
        return 1 + 0.1 * torch.randn(n, generator=gen)

    out = []
    for i in range(layers):
        out.append(ops.DecoderLayerWeights(
            attn_norm=vec(hidden), qkv=_proj(gen, qkv_out, hidden, qtypes[0], layout),
            qkv_bias=torch.randn(qkv_out, generator=gen) if bias else None,
            q_norm=vec(head_dim) if qk_norm else None, k_norm=vec(head_dim) if qk_norm else None,
            o=_proj(gen, hidden, heads * head_dim, qtypes[1], layout), mlp_norm=vec(hidden),
            gate_up=_proj(gen, 2 * inter, hidden, qtypes[2], layout),
            down=_proj(gen, hidden, inter, qtypes[3], layout),
            k_cache=torch.randn(blocks, block_size, kv_heads, head_dim, generator=gen),
            v_cache=torch.randn(blocks, block_size, kv_heads, head_dim, generator=gen),
            window=windows[i % len(windows)]))
    return ops.DecoderStack(out, heads, kv_heads, head_dim, 1e-5, head_dim**-0.5)


def step_inputs(stack: ops.DecoderStack, lens: list[int], seed: int = 1) -> tuple:
    """A decode step of len(lens) sequences whose contexts (new token included) have
    these lengths, each over its own shuffled blocks."""
    gen = torch.Generator().manual_seed(seed)
    first = stack.layers[0]
    num_blocks, bs = first.k_cache.shape[:2]
    width = max(-(-n // bs) for n in lens)
    order = torch.randperm(num_blocks, generator=gen)
    tables = order[:len(lens) * width].view(len(lens), width).to(torch.int32)
    positions = torch.tensor(lens) - 1
    slots = torch.stack([tables[i, p // bs].long() * bs + p % bs for i, p in enumerate(positions.tolist())])
    x = torch.randn(len(lens), first.attn_norm.shape[0], generator=gen)
    rope = ops.rope_at(positions, *ops.rope_cos_sin(stack.head_dim, 64, 10000.0))
    return x, stack, *rope, slots, tables, torch.tensor(lens, dtype=torch.int32)


def _run(impl: str, args: tuple, linear: str | None = None) -> tuple:
    x, stack, *rest = args
    caches = [(layer.k_cache.clone(), layer.v_cache.clone()) for layer in stack.layers]
    forced = {} if linear is None else {"quantized_linear": linear}
    with torch.inference_mode(), ops.use(decode_layers=impl, **forced):
        out = ops.decode_layers(x.clone(), stack, *rest)
    written = [(layer.k_cache.clone(), layer.v_cache.clone()) for layer in stack.layers]
    for layer, (k, v) in zip(stack.layers, caches, strict=True):
        layer.k_cache.copy_(k)
        layer.v_cache.copy_(v)
    return out, written


@pytest.mark.parametrize("kw, lens", [
    ({}, [1, 7, 19]),
    ({"bias": True, "qk_norm": True}, [4, 1]),
    ({"heads": 4, "kv_heads": 2, "head_dim": 16, "hidden": 64, "inter": 96,
      "qtypes": (("q8_0",), ("q4_1",), ("q4_0", "q4_1"), ("q8_0",))}, [13]),
    ({"hidden": 256, "inter": 256, "head_dim": 64, "heads": 4, "kv_heads": 2, "layers": 2,
      "qtypes": (("q4_k",), ("q5_k",), ("q6_k",), ("q4_k",))}, [2, 9, 30]),
])
@pytest.mark.parametrize("linear", [None, "cpp"])
@pytest.mark.parametrize("layout", ["rows", "rows8"])
def test_one_call_equals_the_per_op_path(kw, lens, linear, layout) -> None:
    """Bit for bit, with the decode step's default activations (int8 where the type has
    the kernel) and with fp32 ones (``quantized_linear=cpp`` forced), with the blocks in
    either layout (parts of 80 rows and more: whole groups of 8 and a remainder)."""
    stack = make_stack(**kw, layout=layout)
    args = step_inputs(stack, lens)
    (out, res), caches = _run("cpp", args, linear)
    (ref_out, ref_res), ref_caches = _run("reference", args, linear)
    assert torch.equal(out, ref_out) and torch.equal(res, ref_res)
    for (k, v), (rk, rv) in zip(caches, ref_caches, strict=True):
        assert torch.equal(k, rk) and torch.equal(v, rv)
    assert len(stack.native()) == len(stack.layers)


def test_decode_steps_take_int8_activations_unless_another_linear_is_forced() -> None:
    x = torch.randn(3, 64)
    q41 = quantize(torch.randn(32, 64), "q4_1")
    q4k = QuantizedWeight("q4_k", torch.from_numpy(random_quant_blocks("q4_k", 32, 256, 0)), 256)
    assert ops.decode_int8_activations(x, q41)
    assert not ops.decode_int8_activations(torch.randn(3, 256), q4k)
    with ops.use(quantized_linear="cpp"):
        assert not ops.decode_int8_activations(x, q41)
    with ops.use(quantized_linear="int8"):
        assert ops.decode_int8_activations(x, q41)
    stack = make_stack(qtypes=(("q4_1",), ("q4_1",), ("q4_1",), ("q4_1",)))
    x, stack, *rest = step_inputs(stack, [5, 2])
    with torch.inference_mode():
        (default, _), _ = _run("cpp", (x, stack, *rest))
        (fp32, _), _ = _run("cpp", (x, stack, *rest), "cpp")
        (int8, _), _ = _run("cpp", (x, stack, *rest), "int8")
    assert torch.equal(default, int8) and not torch.equal(default, fp32)
    assert ((default - fp32).norm() / fp32.norm()).item() < 0.05  # the rounding, not garbage


def test_a_skipped_slot_writes_nothing() -> None:
    stack = make_stack(layers=1)
    x, stack, cos, sin, slots, tables, lens = step_inputs(stack, [3, 5])
    before = stack.layers[0].k_cache.clone()
    with torch.inference_mode():
        ops.decode_layers(x, stack, cos, sin, torch.tensor([-1, -1]), tables, lens)
    assert torch.equal(stack.layers[0].k_cache, before)


@pytest.mark.parametrize("change, match", [
    (lambda a: {"slot_mapping": torch.tensor([0, 96])}, r"slot_mapping\[1\] = 96"),
    (lambda a: {"context_lens": torch.tensor([3, 99], dtype=torch.int32)}, "context"),
    (lambda a: {"block_tables": torch.full((2, 2), 40, dtype=torch.int32)}, "block"),
    (lambda a: {"x": torch.randn(2, 95)}, r"x \(2, 95\) must be \(tokens, 96\)"),
    (lambda a: {"cos": a["cos"][:1], "sin": a["sin"][:1]}, "one row per token"),
])
def test_bad_step_inputs_are_value_errors(change, match) -> None:
    stack = make_stack(layers=1)
    x, stack, cos, sin, slots, tables, lens = step_inputs(stack, [3, 5])
    a = {"x": x, "cos": cos, "sin": sin, "slot_mapping": slots, "block_tables": tables,
         "context_lens": lens}
    a.update(change(a))
    residual = torch.empty_like(a["x"])
    with pytest.raises(ValueError, match=match):
        stack.native().forward(a["x"].numpy(), residual.numpy(), a["cos"].numpy(),
                               a["sin"].numpy(), a["slot_mapping"].numpy(),
                               a["block_tables"].numpy(), a["context_lens"].numpy())


def test_bad_layers_are_refused_when_added() -> None:
    good = make_stack(layers=1).layers[0]
    parts = lambda ws: [(w.blocks.numpy(), w.qtype, w.layout) for w in ws]  # noqa: E731
    args = dict(attn_norm=good.attn_norm.numpy(), qkv=parts(good.qkv), qkv_bias=None,
                q_norm=None, k_norm=None, o=parts(good.o), mlp_norm=good.mlp_norm.numpy(),
                gate_up=parts(good.gate_up), down=parts(good.down),
                k_cache=good.k_cache.numpy(), v_cache=good.v_cache.numpy())
    cases = [
        ({"attn_norm": torch.ones(95).numpy()}, ValueError, r"attn_norm \(95,\) must be \(96,\)"),
        ({"o": parts(good.o)[:0]}, ValueError, "o must stack 96 rows"),
        ({"down": parts(good.o)}, ValueError, r"down's blocks \(96, 54\) must be \(rows, 90\)"),
        ({"qkv": [good.qkv[0].blocks.numpy()]}, TypeError, r"list of \(blocks, qtype, layout\)"),
        ({"gate_up": [(good.gate_up[0].blocks.numpy(), "q3_k", "rows")]}, ValueError,
         "qtype must be"),
        ({"gate_up": [(good.gate_up[0].blocks.numpy(), "q8_0", "cols")]}, ValueError,
         "layout must be 'rows' or 'rows8'"),
        ({"q_norm": torch.ones(32).numpy()}, ValueError, "both be given"),
        ({"k_cache": torch.zeros(16, 4, 2, 32).numpy(), "v_cache": torch.zeros(16, 4, 2, 32).numpy()},
         ValueError, "k_cache"),
        ({"k_cache": good.k_cache.double().numpy()}, TypeError, "float32"),
    ]
    for change, error, match in cases:
        stack = _C.DecoderStack(96, 3, 1, 32, 160, 1e-5, 32**-0.5)
        with pytest.raises(error, match=match):
            stack.add_layer(**{**args, **change})
    stack = _C.DecoderStack(96, 3, 1, 32, 160, 1e-5, 32**-0.5)
    stack.add_layer(**args)
    other = torch.zeros(8, 4, 1, 32).numpy()
    with pytest.raises(ValueError, match="first layer's cache"):
        stack.add_layer(**{**args, "k_cache": other, "v_cache": other.copy()})
    with pytest.raises(ValueError, match="window"):
        stack.add_layer(**args, window=-1)
    with pytest.raises(ValueError, match="heads a multiple of kv_heads"):
        _C.DecoderStack(96, 3, 2, 32, 160, 1e-5, 1.0)


def test_only_quantized_dense_llama_layers_make_a_stack() -> None:
    cfg = dict(vocab_size=64, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
               intermediate_size=96, max_position_embeddings=64)
    caches = [(torch.zeros(4, 4, 2, 16), torch.zeros(4, 4, 2, 16))] * 2
    dense = Transformer(ModelConfig(arch="llama", **cfg))
    assert dense.decoder_stack(caches) is None  # fp32 projections: the per-op path
    dense.quantize("q8_0")
    assert len(dense.decoder_stack(caches).layers) == 2
    moe = Transformer(ModelConfig(arch="llama", num_experts=3, num_experts_per_tok=2,
                                  moe_intermediate_size=32, **cfg))
    moe.quantize("q8_0")
    assert moe.decoder_stack(caches) is None


def test_engine_generates_the_same_tokens_with_and_without_it(tokenizer) -> None:  # noqa: F811
    model = random_llama(7, vocab_size=tokenizer.vocab_size, hidden_size=64, num_layers=2,
                         num_heads=4, num_kv_heads=2, intermediate_size=128)
    model.quantize("q4_1")
    llm = make_llm(model, tokenizer)
    assert llm.engine.runner.decoder is not None
    params = SamplingParams(temperature=0, max_tokens=16)
    outs = {}
    for impl in ("cpp", "reference"):
        with ops.use(decode_layers=impl):
            outs[impl] = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params)]
    assert outs["cpp"] == outs["reference"]
