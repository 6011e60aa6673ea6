"""Mixture of SwiGLU experts: TFLOP/s of the fused Triton MoE kernel and its references.

Cases are (tokens, hidden, width, experts, top_k): Mixtral-8x7B's expert shapes
(4096 hidden, 14336 wide, 8 experts, top 2) and Qwen3-30B-A3B's (2048 hidden, 768 wide,
128 experts, top 8), from a decode batch to a prefill chunk, in bf16 on CUDA; one tiny
fp32 case on CPU. Routing comes from random router logits (softmax top-k,
renormalised), the same for every implementation.

Useful FLOPs per call: ``2 · tokens · top_k · 3 · hidden · width`` (the gate, up and
down projections of each (token, expert) pair); the ceiling is the device's measured
matmul rate.

Implementations: ``llm_engine`` (``kernels.moe.fused_moe``: two grouped-GEMM launches,
the SwiGLU and the routing weights fused), ``reference loop`` (``moe_reference``, one
pair of matmuls per expert with tokens: what the CPU runs), ``vllm`` (vLLM's
``fused_experts``) when importable. ``rel_err`` is against ``moe_reference`` in fp32 on
upcast inputs. On CPU ``llm_engine`` is the kernel under ``TRITON_INTERPRET=1``, else
the reference loop (noted either way: not a speed figure for the kernel).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from llm_engine.bench.common import INTERPRETER_NOTE, OURS, Ceilings, Row, rel_error, time_ms
from llm_engine.kernels._utils import interpreting
from llm_engine.kernels.moe import fused_moe, moe_reference, route_topk

SUITE = "moe"
Impl = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
                torch.Tensor]


def _cases(device: str, quick: bool) -> list[tuple[str, int, int, int, int, int]]:
    """(name, tokens, hidden, width, experts, top_k)."""
    if torch.device(device).type != "cuda":
        return [("tiny", 16, 64, 96, 6, 2)]
    tokens = (1, 64, 2048) if quick else (1, 16, 64, 256, 1024, 4096)
    return ([("mixtral", t, 4096, 14336, 8, 2) for t in tokens]
            + [("qwen3-30b-a3b", t, 2048, 768, 128, 8) for t in tokens])


def _vllm() -> tuple[Impl | None, str]:
    try:
        from vllm.model_executor.layers.fused_moe import fused_experts
    except Exception as e:  # ImportError, or vLLM failing to initialise on this machine
        return None, f"vLLM not importable ({type(e).__name__}: {str(e)[:120]})"

    def run(x, up, down, weights, experts):
        return fused_experts(x, up, down, weights.float(), experts.to(torch.int32))

    return run, ""


def iter_rows(device: str, quick: bool, ceilings: Ceilings):
    cuda = torch.device(device).type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    vllm, vllm_note = _vllm() if cuda else (None, "vLLM needs CUDA")
    ours: Impl = fused_moe
    ours_note = ""
    if interpreting():
        ours_note = INTERPRETER_NOTE
    elif not cuda:
        ours, ours_note = moe_reference, "CPU: the engine's PyTorch path (the reference loop)"
    gen = torch.Generator(device=device).manual_seed(0)
    for name, tokens, hidden, width, num_experts, top_k in _cases(device, quick):
        x = torch.randn(tokens, hidden, device=device, generator=gen).to(dtype)
        up = (torch.randn(num_experts, 2 * width, hidden, device=device, generator=gen)
              * hidden**-0.5).to(dtype)
        down = (torch.randn(num_experts, hidden, width, device=device, generator=gen)
                * width**-0.5).to(dtype)
        weights, experts = route_topk(torch.randn(tokens, num_experts, device=device,
                                                  generator=gen), top_k, True)
        ref = moe_reference(x.float(), up.float(), down.float(), weights, experts)
        args = (x, up, down, weights, experts)
        flops = 2.0 * tokens * top_k * 3 * hidden * width
        params = {"tokens": tokens, "hidden": hidden, "width": width, "experts": num_experts,
                  "top_k": top_k}
        case = f"{name} {tokens} tokens"
        for impl_name, impl, note in ((OURS, ours, ours_note),
                                      ("reference loop", moe_reference, ""),
                                      ("vllm", vllm, vllm_note)):
            if impl is None:
                yield Row(SUITE, case, impl_name, "TFLOP/s", None, params=params, note=note)
                continue
            try:
                out = impl(*args)
                ms = time_ms(lambda impl=impl, args=args: impl(*args), device, quick=quick)
            except Exception as e:  # a peer failing is reported, not fatal
                if impl_name == OURS:
                    raise
                yield Row(SUITE, case, impl_name, "TFLOP/s", None, params=params,
                          note=f"failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
                continue
            tflops = flops / (ms * 1e-3) / 1e12
            yield Row(SUITE, case, impl_name, "TFLOP/s", tflops, ms=ms,
                      ceiling_frac=tflops / ceilings.matmul_tflops,
                      rel_err=rel_error(out.float(), ref), params=params, note=note)


def run(device: str, quick: bool, ceilings: Ceilings) -> list[Row]:
    """Rows for every case and implementation (see the module docstring)."""
    return list(iter_rows(device, quick, ceilings))
