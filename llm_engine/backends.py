"""``llm-engine backends`` and the ``--backend op=impl`` option of the commands that run ops.

The table shows, for every op, its implementations in preference order, which of them
can take the default model's typical inputs on this machine (inference and training)
and which one runs. Nothing here imports the kernels until a command needs them.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch

ORDER = ("linear", "quantized_linear", "rms_norm", "layer_norm", "apply_rope", "store_kv_cache",
         "paged_attention", "paged_prefill_attention", "attention_varlen", "silu_mul", "moe", "sample",
         "cross_entropy")
"""The table's order: as a layer runs them; ops registered later come after these."""
TRAINING_OPS = ("linear", "rms_norm", "layer_norm", "apply_rope", "silu_mul",
                "attention_varlen", "cross_entropy", "moe")


def add_backend_arg(p: argparse.ArgumentParser) -> None:
    """``--backend op=impl``, repeatable (``llm-engine backends`` lists the names)."""
    p.add_argument("--backend", action="append", default=[], metavar="OP=IMPL",
                   help="force an op's implementation, e.g. rms_norm=reference "
                        "(repeatable; `llm-engine backends` lists them)")


def apply_backend_args(values: list[str]) -> None:
    """Force the ``--backend`` choices for the rest of the process (ValueError if unknown)."""
    if values:
        from llm_engine import ops

        ops.set_backends(",".join(values))


def typical_calls(device: torch.device, dtype: torch.dtype, grad: bool
                  ) -> dict[str, tuple[tuple, dict]]:
    """Arguments like the default model's (SmolLM2-135M's shapes, 4 tokens) for each op;
    ``grad``: as in training (leaves that require a gradient; decode-only ops left out)."""
    from llm_engine import ops
    from llm_engine.config import ModelConfig
    from llm_engine.quant import QuantizedWeight

    c = ModelConfig()
    tokens, blocks, block_size = 4, 8, 16

    def t(*shape: int, dt: torch.dtype = dtype, leaf: bool = grad) -> torch.Tensor:
        return torch.zeros(shape, device=device, dtype=dt).requires_grad_(leaf and dt.is_floating_point)

    x, w = t(tokens, c.hidden_size), t(c.hidden_size)
    qkv = t(tokens, c.num_heads + 2 * c.num_kv_heads, c.head_dim, leaf=False)
    q, k = qkv[:, :c.num_heads], qkv[:, c.num_heads:c.num_heads + c.num_kv_heads]
    cos, sin = ops.rope_at(torch.arange(tokens, device=device),
                           *ops.rope_cos_sin(c.head_dim, 64, c.rope_theta, device))
    cu = torch.tensor([0, tokens], device=device, dtype=torch.int32)
    cache = t(blocks, block_size, c.num_kv_heads, c.head_dim, leaf=False)
    tables = torch.arange(blocks, device=device, dtype=torch.int32).view(1, blocks)
    lens = torch.tensor([tokens], device=device, dtype=torch.int32)
    slots = torch.arange(tokens, device=device)
    def q4_1(out: int, inp: int) -> QuantizedWeight:
        return QuantizedWeight("q4_1", torch.zeros(out, inp // 32 * 20, dtype=torch.uint8,
                                                   device=device), inp)

    q_size, kv_size = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    layer = ops.DecoderLayerWeights(
        attn_norm=w, qkv=[q4_1(q_size + 2 * kv_size, c.hidden_size)], qkv_bias=None,
        q_norm=None, k_norm=None, o=[q4_1(c.hidden_size, q_size)], mlp_norm=w,
        gate_up=[q4_1(2 * c.intermediate_size, c.hidden_size)],
        down=[q4_1(c.hidden_size, c.intermediate_size)], k_cache=cache, v_cache=cache)
    stack = ops.DecoderStack([layer], c.num_heads, c.num_kv_heads, c.head_dim, c.norm_eps,
                             c.head_dim**-0.5)
    calls = {
        "linear": ((x, t(c.intermediate_size, c.hidden_size)), {}),
        "quantized_linear": ((x, q4_1(c.intermediate_size, c.hidden_size)), {}),
        "rms_norm": ((x, w, c.norm_eps), {"residual": t(tokens, c.hidden_size)}),
        "layer_norm": ((x, w, t(c.hidden_size), c.norm_eps), {}),
        "apply_rope": ((q if not grad else t(tokens, c.num_heads, c.head_dim), cos, sin), {}),
        "silu_mul": ((t(tokens, 2 * c.intermediate_size),), {}),
        "attention_varlen": ((t(tokens, c.num_heads, c.head_dim), t(tokens, c.num_kv_heads, c.head_dim),
                              t(tokens, c.num_kv_heads, c.head_dim), cu, cu, tokens, tokens), {}),
        "cross_entropy": ((x, t(c.vocab_size, c.hidden_size),
                           torch.zeros(tokens, device=device, dtype=torch.int64)), {}),
        "store_kv_cache": ((k, k, cache, cache, slots), {}),
        "paged_attention": ((q[:1], cache, cache, tables, lens[:1]), {}),
        "paged_prefill_attention": ((q, cache, cache, tables, cu, lens, tokens), {}),
        "sample": ((t(1, c.vocab_size, dt=torch.float32), 0.7), {}),
        "decode_layers": ((x[:1], stack, cos[:1], sin[:1], slots[:1], tables, lens[:1]), {}),
        "moe": ((x, t(4, 2 * c.intermediate_size, c.hidden_size),
                 t(4, c.hidden_size, c.intermediate_size), t(tokens, 2, dt=torch.float32),
                 torch.zeros(tokens, 2, device=device, dtype=torch.int64)), {}),
    }
    return {op: call for op, call in calls.items() if not grad or op in TRAINING_OPS}


def backends_table(device: str | None = None, dtype: torch.dtype | None = None) -> str:
    """The ``llm-engine backends`` table as text."""
    from llm_engine import ops

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or (torch.bfloat16 if dev.type == "cuda" else torch.float32)
    reg = ops.registry()
    with torch.inference_mode():
        infer = typical_calls(dev, dtype, grad=False)
    train = typical_calls(dev, dtype, grad=True)

    def column(calls: dict, op: str, scope: Callable[[], object]) -> dict[str, str]:
        if op not in calls:
            return {}
        args, kwargs = calls[op]
        with scope():
            ok = reg.eligible(op, *args, **kwargs)
            try:
                chosen = reg.choose(op, *args, **kwargs)
            except ValueError:
                chosen = None
        return {n: "chosen" if n == chosen else ("yes" if why is None else "no")
                for n, why in ok.items()}

    settings = reg.settings()
    forced = [f"{k}={v}" for k, v in settings.forced.items()]
    if settings.shorthand:
        forced.insert(0, f"all={settings.shorthand}")
    lines = [f"device {dev.type}, dtype {str(dtype).removeprefix('torch.')}, the default model's "
             f"shapes; implementations in preference order",
             f"forced: {', '.join(forced) if forced else 'nothing'}", ""]
    rows = [("op / implementation", "inference", "training", "what it is; what it takes")]
    for name in sorted(reg.ops, key=lambda n: ORDER.index(n) if n in ORDER else len(ORDER)):
        op = reg.ops[name]
        inf = column(infer, name, torch.inference_mode)
        tr = column(train, name, torch.enable_grad)
        rows.append((name, "", "", op.summary))
        for impl_name, impl in op.impls.items():
            rows.append((f"  {impl_name}", inf.get(impl_name, "n/a"), tr.get(impl_name, "n/a"),
                         f"  {impl.summary}; {impl.needs.describe(op)}"))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for r in rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(r[:3], widths, strict=True)) + "  "
                     + r[3])
    lines += ["", "yes: eligible for these inputs; chosen: what runs; n/a: the op does not run "
              "there. Force one with --backend op=impl, LLM_ENGINE_BACKENDS=op=impl,... or "
              "ops.use(op=impl)."]
    return "\n".join(lines)
