"""The fused MoE kernel (interpreter on CPU) against its per-expert-loop reference in fp64,
the routing, and bad input."""

from __future__ import annotations

import pytest
import torch
from llm_engine.kernels.moe import _group_by_expert, fused_moe, moe_reference, route_topk
from testing_utils import assert_close, interpreter_or_cuda, run_compile_script

DEVICE = interpreter_or_cuda()


def weights_for(num_experts, hidden, width, dtype):
    up = torch.randn(num_experts, 2 * width, hidden, device=DEVICE) * hidden**-0.5
    down = torch.randn(num_experts, hidden, width, device=DEVICE) * width**-0.5
    return up.to(dtype), down.to(dtype)


def check(x, up, down, weights, experts, dtype) -> None:
    out = fused_moe(x, up, down, weights, experts)
    ref = moe_reference(x.double(), up.double(), down.double(), weights.double(), experts)
    assert out.dtype == dtype and out.shape == x.shape
    assert_close(out, ref, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("tokens,hidden,width,num_experts,top_k", [
    (1, 32, 48, 4, 1),     # one token
    (19, 40, 24, 5, 2),    # expert count and sizes not powers of two
    (8, 16, 16, 3, 3),     # every expert on every token
])
def test_fused_moe_matches_reference_on_odd_shapes(tokens, hidden, width, num_experts, top_k,
                                                   dtype) -> None:
    x = torch.randn(tokens, hidden, device=DEVICE).to(dtype)
    up, down = weights_for(num_experts, hidden, width, dtype)
    weights, experts = route_topk(torch.randn(tokens, num_experts, device=DEVICE), top_k, True)
    check(x, up, down, weights, experts, dtype)


def test_every_token_on_one_expert_and_experts_without_tokens() -> None:
    dtype = torch.float32
    x = torch.randn(21, 32, device=DEVICE)
    up, down = weights_for(6, 32, 40, dtype)
    experts = torch.full((21, 1), 4, dtype=torch.int64, device=DEVICE)
    weights = torch.rand(21, 1, device=DEVICE)
    check(x, up, down, weights, experts, dtype)
    # top-2 where experts 0, 2 and 5 get nothing
    experts = torch.stack([torch.full((21,), 1), torch.full((21,), 3)], 1).to(DEVICE)
    experts[::4] = torch.tensor([4, 1], device=DEVICE)
    check(x, up, down, torch.rand(21, 2, device=DEVICE), experts, dtype)


def test_grouping_pads_each_expert_run_to_whole_blocks() -> None:
    experts = torch.tensor([[2, 0], [2, 1], [0, 2]])
    pairs, block_expert = _group_by_expert(experts, 4, 4)
    assert block_expert.tolist()[:3] == [0, 1, 2] and set(block_expert.tolist()[3:]) == {-1}
    runs = pairs.view(-1, 4).tolist()
    assert runs[0] == [1, 4, 6, 6]  # expert 0: pairs 1 and 4, then padding (num_pairs)
    assert runs[1] == [3, 6, 6, 6]
    assert runs[2] == [0, 2, 5, 6]


def test_routing_softmax_top_k_with_and_without_renormalising() -> None:
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    probs = torch.softmax(logits, -1)[0]
    w, e = route_topk(logits, 2, normalize=False)
    assert e.tolist() == [[1, 2]]
    torch.testing.assert_close(w[0], probs[[1, 2]])
    w, _ = route_topk(logits, 2, normalize=True)
    torch.testing.assert_close(w[0], probs[[1, 2]] / probs[[1, 2]].sum())


def test_bad_input_is_a_clear_error() -> None:
    x = torch.randn(3, 16, device=DEVICE)
    up, down = weights_for(4, 16, 8, torch.float32)
    w, e = route_topk(torch.randn(3, 4, device=DEVICE), 2, True)
    with pytest.raises(ValueError, match="top_k"):
        route_topk(torch.randn(3, 4), 5, True)
    with pytest.raises(ValueError, match="experts must hold ids"):
        fused_moe(x, up, down, w, e + 3)
    with pytest.raises(ValueError, match="down_proj must be"):
        fused_moe(x, up, down[:, :, :4], w, e)
    with pytest.raises(ValueError, match="weights and experts"):
        moe_reference(x, up, down, w[:2], e)
    with pytest.raises(ValueError, match="up_proj"):
        moe_reference(x, up.half(), down, w, e)


_COMPILE_FOR_SM90 = r"""
import os
os.environ["TRITON_INTERPRET"] = "0"
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

import llm_engine.kernels.moe as M

POINTERS = {"pair_ptr": "*i32", "block_expert_ptr": "*i32", "weight_ptr": "*fp32"}
for name, fn in (("gate_up", M._moe_gate_up_kernel), ("down", M._moe_down_kernel)):
    signature = {}
    for param in fn.params:
        arg = param.name
        if param.is_constexpr:
            signature[arg] = "constexpr"
        elif arg.endswith("_ptr"):
            signature[arg] = POINTERS.get(arg, "*fp32" if arg == "out_ptr" else "*bf16")
        else:
            signature[arg] = "i32"
    constexprs = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, IN_PREC="tf32")
    compiled = triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": 4, "num_stages": 3})
    assert compiled.asm["cubin"], name
    print(name, "ok")
"""


def test_moe_kernels_compile_for_sm90_without_a_gpu() -> None:
    assert run_compile_script(_COMPILE_FOR_SM90) == ["gate_up", "ok", "down", "ok"]
