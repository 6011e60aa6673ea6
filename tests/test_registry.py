"""The op registry: every implementation of every op, selected by name through the public
registry, against the op's reference; the default choice; forcing a choice (``ops.use``,
``set_backends``, the environment) and its errors."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable

import pytest
import torch
from test_decoder_stack import make_stack, step_inputs
from testing_utils import assert_close

from llm_engine import ops
from llm_engine.ops import dispatch
from llm_engine.ops.quantized import int8_rounded
from llm_engine.quant import quantize

REG = ops.registry()


def _rope_inputs() -> tuple:
    qkv = torch.randn(5, 4, 8)
    factors = ops.rope_at(torch.tensor([0, 3, 1, 7, 2]), *ops.rope_cos_sin(8, 16, 10000.0))
    return (qkv[:, 1:3], *factors), {}  # q as a slice of the QKV rows, as in the model


def _caches(blocks: int = 4, block_size: int = 4, kv_heads: int = 1, d: int = 32) -> list:
    return [torch.randn(blocks, block_size, kv_heads, d) for _ in range(2)]


def _paged_inputs() -> tuple:
    tables = torch.tensor([[2, 0], [1, 3]], dtype=torch.int32)
    return (torch.randn(2, 2, 32), *_caches(), tables, torch.tensor([3, 7], dtype=torch.int32)), {}


def _prefill_inputs() -> tuple:
    tables = torch.tensor([[2, 0], [1, 3]], dtype=torch.int32)
    cu = torch.tensor([0, 2, 5], dtype=torch.int32)
    return (torch.randn(5, 2, 32), *_caches(), tables, cu,
            torch.tensor([4, 6], dtype=torch.int32), 3), {}


def _varlen_inputs() -> tuple:
    cu = torch.tensor([0, 2, 5], dtype=torch.int32)
    return (torch.randn(5, 2, 32), torch.randn(5, 1, 32), torch.randn(5, 1, 32), cu, cu, 3, 3), {}


def _store_inputs() -> tuple:
    qkv = torch.randn(3, 3, 4)
    return (qkv[:, 1:2], qkv[:, 2:3], *_caches(d=4), torch.tensor([5, -1, 0])), {}


# op -> (fresh inputs (args, kwargs), whether gradients are compared). Small odd shapes:
# the Triton implementations run in the interpreter here.
CASES: dict[str, tuple[Callable[[], tuple], bool]] = {
    "linear": (lambda: ((torch.randn(3, 7), torch.randn(5, 7), torch.randn(5)), {}), True),
    "quantized_linear": (lambda: ((torch.randn(67, 64), quantize(torch.randn(5, 64), "q4_1"),
                                   torch.randn(5)), {}), True),
    "rms_norm": (lambda: ((torch.randn(3, 9), torch.randn(9), 1e-5),
                          {"residual": torch.randn(3, 9)}), True),
    "layer_norm": (lambda: ((torch.randn(3, 9), torch.randn(9), torch.randn(9), 1e-5), {}), True),
    "silu_mul": (lambda: ((torch.randn(3, 10),), {}), True),
    "apply_rope": (_rope_inputs, False),
    "attention_varlen": (_varlen_inputs, True),
    "store_kv_cache": (_store_inputs, False),
    "paged_attention": (_paged_inputs, False),
    "paged_prefill_attention": (_prefill_inputs, False),
    "sample": (lambda: ((torch.randn(3, 50), 1.0), {"top_k": 1}), False),
    "cross_entropy": (lambda: ((torch.randn(6, 8), torch.randn(11, 8),
                                torch.tensor([1, 0, 10, -100, 3, 3])), {}), True),
    "decode_layers": (lambda: (step_inputs(make_stack(layers=2), [3, 1, 6]), {}), False),
    "moe": (lambda: ((torch.randn(5, 16), torch.randn(3, 16, 16), torch.randn(3, 16, 8),
                      torch.rand(5, 2), torch.tensor([[0, 2], [2, 1], [1, 0], [2, 0], [0, 1]])),
                     {}), True),
}

IMPLS = [(op, impl) for op in REG.ops for impl in REG.ops[op].impls]

# Implementations that round their inputs on purpose: the reference sees them rounded.
ROUNDED_INPUTS: dict[tuple[str, str], Callable[[tuple], tuple]] = {
    ("quantized_linear", "int8"): lambda args: (int8_rounded(args[0]), *args[1:]),
}


def _run(op: str, impl: str, args: tuple, kwargs: dict):
    """Call the public op with ``impl`` forced; the outputs to compare (for the cache
    store, the caches it wrote)."""
    with ops.use(**{op: impl}):
        out = getattr(ops, op)(*args, **kwargs)
    return args[2:4] if op == "store_kv_cache" else out


def _flat(out) -> list[torch.Tensor]:
    return list(out) if isinstance(out, (tuple, list)) else [out]


def test_every_op_has_a_case_and_a_reference() -> None:
    assert set(CASES) == set(REG.ops)
    for op in REG.ops.values():
        assert "reference" in op.impls, op.name


@pytest.mark.parametrize("op, impl", IMPLS)
def test_each_implementation_matches_the_reference(op: str, impl: str) -> None:
    make, with_grad = CASES[op]
    torch.manual_seed(0)
    args, kwargs = make()
    if REG.eligible(op, *args, **kwargs)[impl] is not None:
        pytest.skip(f"{impl} cannot take CPU fp32 inputs here")
    clone = lambda a: a.clone() if isinstance(a, torch.Tensor) else a
    ref_args = ROUNDED_INPUTS.get((op, impl), lambda a: a)(tuple(map(clone, args)))
    with torch.no_grad():
        ref = _run(op, "reference", ref_args, kwargs)
        out = _run(op, impl, args, kwargs)
    for o, r in zip(_flat(out), _flat(ref), strict=True):
        if o.dtype.is_floating_point:
            assert_close(o, r, torch.float32, what=f"{op}={impl}")
        else:
            assert torch.equal(o, r)


@pytest.mark.parametrize("op, impl", [(o, i) for o, i in IMPLS if CASES[o][1]])
def test_each_implementation_with_a_gradient_matches_the_reference(op: str, impl: str) -> None:
    make, _ = CASES[op]
    torch.manual_seed(0)
    args, kwargs = make()
    leaves = [a for a in (*args, *kwargs.values())
              if isinstance(a, torch.Tensor) and a.dtype.is_floating_point]
    for t in leaves:
        t.requires_grad_(True)
    why = REG.eligible(op, *args, **kwargs)[impl]
    if why is not None:
        assert "grad" in why or "CUDA" in why, why  # the C++ kernels have no backward
        with ops.use(**{op: impl}), pytest.raises(ValueError, match=f"{op}={impl} cannot take"):
            getattr(ops, op)(*args, **kwargs)
        return
    grads = {}
    for name in ("reference", impl):
        out = _flat(_run(op, name, args, kwargs))
        total = sum((o.float() * torch.linspace(-1, 1, o.numel()).view(o.shape)).sum() for o in out)
        grads[name] = torch.autograd.grad(total, leaves)
    for g, r in zip(grads[impl], grads["reference"], strict=True):
        assert_close(g, r, torch.float32, grad=True, what=f"{op}={impl} gradient")


def test_default_choice_on_cpu() -> None:
    x, w = torch.randn(3, 8), torch.randn(8)
    assert REG.choose("rms_norm", x, w, 1e-5) == "cpp"
    assert REG.choose("rms_norm", x.requires_grad_(), w, 1e-5) == "reference"
    assert REG.choose("rms_norm", x.detach().half(), w.half(), 1e-5) == "reference"
    assert REG.choose("sample", torch.randn(2, 5), 1.0) == "reference"  # never the interpreter
    args, _ = _varlen_inputs()
    assert REG.choose("attention_varlen", *args) == "sdpa"
    assert REG.choose("attention_varlen", *args[:4], args[3].clone(), *args[5:]) == "sdpa"
    assert REG.choose("attention_varlen", *args[:4], torch.tensor([0, 1, 5]), *args[5:]) \
        == "reference"


def test_use_forces_nests_and_restores() -> None:
    x, w = torch.randn(3, 8), torch.randn(8)
    with ops.use(rms_norm="reference"):
        assert REG.choose("rms_norm", x, w, 1e-5) == "reference"
        with ops.use(silu_mul="reference"):
            assert REG.choose("rms_norm", x, w, 1e-5) == "reference"
            assert REG.choose("silu_mul", x) == "reference"
        assert REG.choose("silu_mul", x) == "cpp"
        with ops.use("triton"):
            assert REG.choose("rms_norm", x, w, 1e-5) == "reference"  # per op wins
            assert REG.choose("layer_norm", x, w, None, 1e-5) == "triton"
            assert REG.choose("silu_mul", x) == "cpp"  # no Triton kernel: the default
    assert REG.choose("rms_norm", x, w, 1e-5) == "cpp"
    with ops.use("torch"):
        assert REG.choose("layer_norm", x.cuda() if torch.cuda.is_available() else x,
                          w, None, 1e-5) == "reference"


def test_unknown_names_and_ineligible_choices_are_clear_errors() -> None:
    with pytest.raises(ValueError, match=r"unknown op 'rmsnorm'; ops: .*rms_norm"):
        ops.use(rmsnorm="cpp").__enter__()
    with pytest.raises(ValueError, match="rms_norm has no implementation 'cuda'; choose from "
                                         "triton, cpp, reference"):
        ops.use(rms_norm="cuda").__enter__()
    with pytest.raises(ValueError, match=r"shorthand must be one of \('torch', 'triton'\)"):
        ops.use("cpp").__enter__()
    x, w = torch.randn(3, 8, dtype=torch.float64), torch.randn(8, dtype=torch.float64)
    with ops.use(rms_norm="cpp"), pytest.raises(
            ValueError, match=r"rms_norm=cpp cannot take these inputs: needs fp32 CPU tensors "
                              r"without grad, got cpu fp64; eligible here: .*reference"):
        ops.rms_norm(x, w, 1e-5)
    with ops.use(rms_norm="cpp"), pytest.raises(ValueError, match=r"needs weight \(hidden,\)"):
        ops.rms_norm(x.float(), w[:5].float(), 1e-5)


def test_backend_strings_parse_and_reject_bad_forms() -> None:
    assert REG.parse(" rms_norm=cpp , linear=reference,") == {"rms_norm": "cpp",
                                                              "linear": "reference"}
    for bad in ("rms_norm", "rms_norm=", "=cpp", "rms_norm:cpp"):
        with pytest.raises(ValueError, match="expected op=impl"):
            REG.parse(bad)
    with pytest.raises(ValueError, match="unknown op 'attention'"):
        REG.parse("attention=triton")
    env = dispatch.settings_from_env({"LLM_ENGINE_BACKENDS": "silu_mul=reference",
                                      "LLM_ENGINE_BACKEND": "triton"})
    assert env.forced == {"silu_mul": "reference"} and env.shorthand == "triton"
    with pytest.raises(ValueError, match="LLM_ENGINE_BACKENDS: expected op=impl"):
        dispatch.settings_from_env({"LLM_ENGINE_BACKENDS": "silu_mul"})
    with pytest.raises(ValueError, match="LLM_ENGINE_BACKEND must be one of"):
        dispatch.settings_from_env({"LLM_ENGINE_BACKEND": "cuda"})


def test_the_environment_is_read_once_for_the_process() -> None:
    code = ("import os, torch; from llm_engine import ops; x = torch.randn(2, 4);"
            "print(ops.registry().choose('rms_norm', x, torch.ones(4), 1e-5));"
            "os.environ['LLM_ENGINE_BACKENDS'] = 'rms_norm=cpp';"
            "print(ops.registry().choose('rms_norm', x, torch.ones(4), 1e-5));"
            "ops.set_backends('rms_norm=cpp');"
            "print(ops.registry().choose('rms_norm', x, torch.ones(4), 1e-5))")
    env = {**os.environ, "LLM_ENGINE_BACKENDS": "rms_norm=reference"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["reference", "reference", "cpp"]
    env["LLM_ENGINE_BACKENDS"] = "rms_norm=fast"
    bad = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert bad.returncode != 0 and "rms_norm has no implementation 'fast'" in bad.stderr


def test_a_registered_implementation_takes_its_place_in_the_order() -> None:
    op = dispatch.Op("scale_test", lambda x: dispatch.tensor_facts("scale_test", x))
    op.register("reference", lambda x: x * 2, dispatch.Needs(), "plain")
    op.register("fast", lambda x: x + x, dispatch.Needs(dtypes=(torch.float16,)), "fp16 only",
                before="reference")
    assert list(op.impls) == ["fast", "reference"]
    settings = dispatch.Settings({})
    assert op.choose(op.signature(torch.ones(2)), settings).name == "reference"
    assert op.choose(op.signature(torch.ones(2).half()), settings).name == "fast"
    with pytest.raises(ValueError, match="already has an implementation named 'fast'"):
        op.register("fast", lambda x: x, dispatch.Needs(), "again")


@pytest.fixture
def process_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever a test forces for the process is undone after it."""
    monkeypatch.setattr(dispatch, "_process", dispatch._process)


def test_backends_command_lists_every_implementation(capsys, process_settings) -> None:
    from llm_engine.cli import main

    assert main(["backends", "--device", "cpu", "--backend", "silu_mul=reference"]) == 0
    out = capsys.readouterr().out
    assert "forced: silu_mul=reference" in out
    lines = out.splitlines()
    for op in REG.ops.values():  # the op's line, then one line per implementation in order
        at = next(i for i, line in enumerate(lines) if line.split()[:1] == [op.name])
        assert [line.split()[0] for line in lines[at + 1:at + 1 + len(op.impls)]] == list(op.impls)
    at = next(i for i, line in enumerate(lines) if line.startswith("silu_mul "))
    assert lines[at + 1].split()[:4] == ["cpp", "yes", "no", "C++"]  # eligible, not forced
    assert lines[at + 2].split()[:3] == ["reference", "chosen", "chosen"]
    assert main(["backends", "--backend", "rms_norm=fast"]) == 2
    assert "rms_norm has no implementation 'fast'" in capsys.readouterr().err


def test_profile_kernel_runs_the_implementation_named(capsys) -> None:
    from llm_engine.cli import main

    base = ["profile-kernel", "rms_norm", "--shape", "3,32", "--iters", "1", "--warmup", "0",
            "--device", "cpu"]
    assert main([*base, "--backend", "rms_norm=cpp"]) == 0
    assert "--backend rms_norm=cpp" in capsys.readouterr().out
    assert main([*base, "--backend", "rms_norm=cpp", "--backward"]) == 2
    assert "rms_norm=cpp cannot take these inputs" in capsys.readouterr().err
    assert main([*base, "--backend", "layer_norm=reference"]) == 2
    assert "rms_norm runs the op rms_norm" in capsys.readouterr().err


def test_bench_ab_option_is_checked(capsys, tmp_path) -> None:
    from llm_engine.cli import main

    for ab, message in (("rms_norm=cpp", "two or more"),
                        ("rms_norm=cpp,fast", "no implementation 'fast'")):
        assert main(["bench", "generate", "--device", "cpu", "--ab", ab]) == 2
        assert message in capsys.readouterr().err
    assert main(["bench", "kv_manager", "--device", "cpu", "--ab", "rms_norm=cpp,reference",
                 "--out", str(tmp_path)]) == 2
    assert "inside the generate suite" in capsys.readouterr().err


def test_generate_ab_rows_time_each_implementation_in_the_model() -> None:
    from llm_engine import LLM
    from llm_engine.bench import generate
    from llm_engine.config import ModelConfig
    from llm_engine.loader import load_model
    from llm_engine.model import Transformer

    tokenizer = load_model("smollm2")[1]
    model = Transformer(ModelConfig(arch="llama", vocab_size=tokenizer.vocab_size, hidden_size=32,
                                    num_layers=1, num_heads=2, num_kv_heads=1,
                                    intermediate_size=64, max_position_embeddings=64)).eval()
    llm = LLM.from_modules(model, tokenizer, kv_cache_memory=1 << 20, enable_prefix_caching=False)
    sizes = generate._Sizes(decode_new=3, tp_requests=2, tp_in=4, tp_out=2, hf_batch=2, repeats=1)
    rows = list(generate._ab_rows(llm, "cpu", sizes, "rms_norm", ("cpp", "reference")))
    assert [(r.case.split("-")[2], r.impl) for r in rows] == [
        ("decode", "rms_norm=cpp"), ("decode", "rms_norm=reference"),
        ("throughput", "rms_norm=cpp"), ("throughput", "rms_norm=reference")]
    assert all(r.value > 0 and 0.0 <= r.rel_err <= 1.0 for r in rows)
    assert rows[0].rel_err == rows[2].rel_err == 0.0  # the first implementation is the baseline
    assert rows[0].note == "1.00x rms_norm=cpp" and rows[1].note.endswith("x rms_norm=cpp")
