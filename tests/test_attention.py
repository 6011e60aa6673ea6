"""Fused attention kernels against the plain-PyTorch reference (forward and dq/dk/dv).

On CPU the kernels run in the Triton interpreter with 16x16 blocks, so the odd
lengths below straddle block edges; the ``gpu`` tests cover bf16, long sequences
and head_dim 128 with the tuned configs.
"""

from __future__ import annotations

import pytest
import torch
from llm_engine.kernels.attention import (
    attention_reference,
    attention_varlen_reference,
    flash_attention,
    flash_attention_varlen,
)
from testing_utils import assert_close, interpreter_or_cuda, run_compile_script

DEVICE = interpreter_or_cuda()


def _inputs(q_shape, kv_shape, dtype, device=DEVICE):
    q = torch.randn(q_shape, dtype=dtype, device=device, requires_grad=True)
    k = torch.randn(kv_shape, dtype=dtype, device=device, requires_grad=True)
    v = torch.randn(kv_shape, dtype=dtype, device=device, requires_grad=True)
    return q, k, v


def _check_against_reference(fn, ref_fn, q, k, v, dtype, **kwargs):
    out = fn(q, k, v, **kwargs)
    assert out.dtype == q.dtype and out.shape == q.shape
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)

    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref = ref_fn(q32, k32, v32, **kwargs)
    ref_grads = torch.autograd.grad(ref, (q32, k32, v32), grad_out.float())

    assert_close(out, ref, dtype, what="out")
    for name, g, rg in zip(("dq", "dk", "dv"), grads, ref_grads, strict=True):
        assert g.dtype == dtype
        assert_close(g, rg, dtype, grad=True, what=name)


def _cu(lengths, device=DEVICE):
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lengths).cumsum(0)
    return cu.to(device)


# (batch, seqlen_q, seqlen_k, heads, kv_heads, head_dim)
DENSE_CASES = {
    "ragged_block_edges": (2, 37, 37, 2, 2, 32),
    "q_shorter_than_k": (1, 19, 45, 2, 1, 32),
    "q_longer_than_k": (1, 45, 19, 2, 2, 32),
    "length_1": (2, 1, 1, 2, 1, 32),
    "single_query_long_context": (1, 1, 40, 2, 2, 32),
    "gqa_9_over_3_head_dim_64": (1, 24, 24, 9, 3, 64),
    "mqa_head_dim_96_padded": (1, 21, 21, 4, 1, 96),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("case", list(DENSE_CASES), ids=list(DENSE_CASES))
def test_dense_matches_reference_forward_and_backward(case, causal, dtype):
    b, tq, tk, h, hk, d = DENSE_CASES[case]
    q, k, v = _inputs((b, tq, h, d), (b, tk, hk, d), dtype)
    _check_against_reference(flash_attention, attention_reference, q, k, v, dtype, causal=causal)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_varlen_ragged_batch_matches_reference(causal, dtype):
    # Includes a length-1 sequence, one longer than the block, and per-sequence
    # seqlen_q != seqlen_k in both directions; 9 query heads over 3 K/V heads.
    lens_q = [1, 21, 34, 6]
    lens_k = [1, 29, 34, 3]
    q, k, v = _inputs((sum(lens_q), 9, 32), (sum(lens_k), 3, 32), dtype)
    kwargs = dict(cu_seqlens_q=_cu(lens_q), cu_seqlens_k=_cu(lens_k),
                  max_seqlen_q=max(lens_q), max_seqlen_k=max(lens_k), causal=causal)
    _check_against_reference(flash_attention_varlen, attention_varlen_reference, q, k, v, dtype,
                             **kwargs)


def test_varlen_equals_dense_attention_of_each_sequence():
    lens = [5, 18]
    q, k, v = _inputs((sum(lens), 2, 32), (sum(lens), 1, 32), torch.float32)
    cu = _cu(lens)
    out = flash_attention_varlen(q, k, v, cu, cu, max(lens), max(lens))
    for start, end in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
        dense = flash_attention(q[None, start:end], k[None, start:end], v[None, start:end])
        assert_close(out[start:end], dense[0], torch.float32, what=f"sequence {start}:{end}")


def test_varlen_empty_query_sequence_still_gets_zero_key_gradients():
    lens_q, lens_k = [0, 7], [5, 7]
    q, k, v = _inputs((sum(lens_q), 2, 32), (sum(lens_k), 2, 32), torch.float32)
    out = flash_attention_varlen(q, k, v, _cu(lens_q), _cu(lens_k), 7, 7, causal=True)
    dq, dk, dv = torch.autograd.grad(out.sum(), (q, k, v))
    assert torch.equal(dk[:5], torch.zeros_like(dk[:5]))
    assert torch.equal(dv[:5], torch.zeros_like(dv[:5]))
    assert dv[5:].abs().sum() > 0


def test_causal_rows_that_see_no_key_give_zero_output_and_gradient():
    # seqlen_q > seqlen_k, bottom-right aligned: the first 20 queries see no key.
    q, k, v = _inputs((1, 30, 2, 32), (1, 10, 2, 32), torch.float32)
    out = flash_attention(q, k, v, causal=True)
    assert torch.equal(out[:, :20], torch.zeros_like(out[:, :20]))
    assert out[:, 20:].abs().sum() > 0
    (dq,) = torch.autograd.grad(out.sum(), (q,))
    assert torch.equal(dq[:, :20], torch.zeros_like(dq[:, :20]))


def test_causal_query_sees_exactly_the_keys_up_to_its_bottom_right_position():
    # Changing a key past the diagonal leaves the output unchanged; one on it does not.
    q, k, v = (t.detach() for t in _inputs((1, 4, 1, 32), (1, 9, 1, 32), torch.float32))
    out = flash_attention(q, k, v, causal=True)
    v2 = v.clone()
    v2[:, 8] += 1.0  # key 8 is visible only to the last query (8 <= 3 + 9 - 4)
    out2 = flash_attention(q, k, v2, causal=True)
    assert torch.equal(out[:, :3], out2[:, :3])
    assert not torch.equal(out[:, 3], out2[:, 3])


def test_softmax_scale_is_applied():
    q, k, v = _inputs((1, 17, 2, 32), (1, 17, 2, 32), torch.float32)
    _check_against_reference(flash_attention, attention_reference, q, k, v, torch.float32,
                             causal=True, softmax_scale=0.3)


def test_backward_is_deterministic():
    q, k, v = _inputs((1, 33, 4, 32), (1, 33, 2, 32), torch.float16)
    grad_out = torch.randn(1, 33, 4, 32, dtype=torch.float16, device=DEVICE)
    first = torch.autograd.grad(flash_attention(q, k, v), (q, k, v), grad_out)
    second = torch.autograd.grad(flash_attention(q, k, v), (q, k, v), grad_out)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


def test_strided_inputs_with_contiguous_last_dim_are_accepted():
    qkv = torch.randn(1, 20, 3, 2, 32, device=DEVICE)
    q, k, v = qkv.unbind(2)
    out = flash_attention(q, k, v)
    assert_close(out, attention_reference(q, k, v), torch.float32)


# --------------------------------------------------------------------------- input checks


def _dense(shape_q=(1, 8, 2, 32), shape_kv=(1, 8, 2, 32), dtype=torch.float32):
    return (torch.randn(shape_q, dtype=dtype, device=DEVICE),
            torch.randn(shape_kv, dtype=dtype, device=DEVICE),
            torch.randn(shape_kv, dtype=dtype, device=DEVICE))


@pytest.mark.parametrize("head_dim", [16, 48, 256])
def test_unsupported_head_dim_is_rejected(head_dim):
    q, k, v = _dense((1, 8, 2, head_dim), (1, 8, 2, head_dim))
    with pytest.raises(ValueError, match="head_dim"):
        flash_attention(q, k, v)


def test_heads_not_divisible_by_kv_heads_is_rejected():
    q, k, v = _dense((1, 8, 9, 32), (1, 8, 2, 32))
    with pytest.raises(ValueError, match="kv_heads"):
        flash_attention(q, k, v)


def test_mismatched_dtypes_are_rejected():
    q, k, v = _dense()
    with pytest.raises(ValueError, match="^k must have dtype"):
        flash_attention(q, k.half(), v)


def test_mismatched_k_and_v_shapes_are_rejected():
    q, k, _ = _dense()
    with pytest.raises(ValueError, match="k and v"):
        flash_attention(q, k, k[:, :4])


def test_batch_mismatch_is_rejected():
    q, k, v = _dense((2, 8, 2, 32))
    with pytest.raises(ValueError, match="batch"):
        flash_attention(q, k, v)


def test_non_contiguous_head_dim_is_rejected():
    q, k, v = _dense()
    with pytest.raises(ValueError, match="^q must be contiguous"):
        flash_attention(q.transpose(1, 3).contiguous().transpose(1, 3), k, v)


def test_wrong_rank_and_integer_dtype_are_rejected():
    q, k, v = _dense()
    with pytest.raises(ValueError, match="^q must have 4 dimensions"):
        flash_attention(q[0], k, v)
    with pytest.raises(ValueError, match="^q must have dtype"):
        flash_attention(q.long(), k, v)


def _varlen(lens=(3, 5)):
    total = sum(lens)
    q = torch.randn(total, 2, 32, device=DEVICE)
    return q, q.clone(), q.clone(), _cu(lens), max(lens)


@pytest.mark.parametrize(
    ("make_cu", "match"),
    [
        (lambda cu: cu.long(), "cu_seqlens_q must have dtype"),
        (lambda cu: cu[None], "cu_seqlens_q must have 1 dimensions"),
        (lambda cu: cu[:1], "cu_seqlens_q must hold"),
        (lambda cu: cu + 1, "cu_seqlens_q must start at 0"),
        (lambda cu: torch.tensor([0, 6, 3, 8], dtype=torch.int32, device=cu.device),
         "never decrease"),
        (lambda cu: torch.tensor([0, 3, 9], dtype=torch.int32, device=cu.device),
         "must end at the number of packed tokens 8"),
    ],
    ids=["int64", "2d", "too_short", "not_from_zero", "decreasing", "wrong_total"],
)
def test_bad_cu_seqlens_are_rejected(make_cu, match):
    q, k, v, cu, max_len = _varlen()
    with pytest.raises(ValueError, match=match):
        flash_attention_varlen(q, k, v, make_cu(cu), cu, max_len, max_len)


def test_max_seqlen_smaller_than_longest_sequence_is_rejected():
    q, k, v, cu, _ = _varlen()
    with pytest.raises(ValueError, match="max_seqlen_k=4"):
        flash_attention_varlen(q, k, v, cu, cu, 5, 4)


def test_cu_seqlens_with_different_sequence_counts_are_rejected():
    q, k, v, cu, max_len = _varlen()
    cu_k = torch.tensor([0, 2, 4, 8], dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="cu_seqlens_k must have the same shape"):
        flash_attention_varlen(q, k, v, cu, cu_k, max_len, max_len)


def test_nonpositive_softmax_scale_is_rejected():
    q, k, v = _dense()
    with pytest.raises(ValueError, match="softmax_scale"):
        flash_attention(q, k, v, softmax_scale=0.0)


# --------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_bf16_dense_on_gpu(head_dim, causal):
    q, k, v = _inputs((2, 1000, 9, head_dim), (2, 1000, 3, head_dim), torch.bfloat16, "cuda")
    _check_against_reference(flash_attention, attention_reference, q, k, v, torch.bfloat16,
                             causal=causal)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=["fp32", "fp16", "bf16"])
def test_varlen_ragged_batch_on_gpu(dtype):
    lens_q = [1, 700, 129, 2048, 63]
    lens_k = [1, 900, 129, 2000, 64]
    q, k, v = _inputs((sum(lens_q), 8, 96), (sum(lens_k), 2, 96), dtype, "cuda")
    kwargs = dict(cu_seqlens_q=_cu(lens_q, "cuda"), cu_seqlens_k=_cu(lens_k, "cuda"),
                  max_seqlen_q=max(lens_q), max_seqlen_k=max(lens_k), causal=True)
    _check_against_reference(flash_attention_varlen, attention_varlen_reference, q, k, v, dtype,
                             **kwargs)


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_long_sequence_head_dim_128_on_gpu(causal):
    q, k, v = _inputs((1, 4500, 4, 128), (1, 4500, 4, 128), torch.bfloat16, "cuda")
    _check_against_reference(flash_attention, attention_reference, q, k, v, torch.bfloat16,
                             causal=causal)


# --------------------------------------------------------------------------- compiled path

_COMPILE_FOR_SM90 = r"""
import os
os.environ["TRITON_INTERPRET"] = "0"
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

import llm_engine.kernels.attention as A

POINTER_TYPES = {"CU_Q": "*i32", "CU_K": "*i32", "LSE": "*fp32", "DELTA": "*fp32"}
for name, fn in (("fwd", A._attn_fwd_kernel), ("dkdv", A._attn_bwd_dkdv_kernel),
                 ("dq", A._attn_bwd_dq_kernel)):
    bm, bn, warps, stages = A._TUNING[name]["d64"][0]
    signature = {}
    for param in fn.params:
        arg = param.name
        if param.is_constexpr:
            signature[arg] = "constexpr"
        elif arg.startswith("stride") or arg == "seqlen_key":
            signature[arg] = "i32"
        elif arg in ("qk_scale", "softmax_scale"):
            signature[arg] = "fp32"
        else:
            signature[arg] = POINTER_TYPES.get(arg, "*bf16")
    constexprs = dict(GROUP=3, HEAD_DIM=64, BLOCK_D=64, CAUSAL=True, DOT_PRECISION="tf32",
                      BLOCK_M=bm, BLOCK_N=bn, WINDOW=0)
    compiled = triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": warps, "num_stages": stages})
    assert compiled.asm["cubin"], name
    print(name, "ok")
"""


def test_kernels_compile_for_sm90_without_a_gpu():
    # The interpreter accepts some programs the compiler rejects; CI has no GPU, so build the
    # bf16 grouped-query causal kernels for Hopper (sm_90) with Triton's bundled ptxas.
    assert run_compile_script(_COMPILE_FOR_SM90) == ["fwd", "ok", "dkdv", "ok", "dq", "ok"]


def test_varlen_reference_dense_path_for_equal_lengths_matches_per_sequence() -> None:
    q = torch.randn(3 * 5, 6, 32)
    k = torch.randn(3 * 7, 2, 32)
    v = torch.randn(3 * 7, 2, 32)
    cu_q = torch.tensor([0, 5, 10, 15], dtype=torch.int32)
    cu_k = torch.tensor([0, 7, 14, 21], dtype=torch.int32)
    out = attention_varlen_reference(q, k, v, cu_q, cu_k, 5, 7, causal=True)
    for i in range(3):
        alone = attention_reference(q[5 * i:5 * i + 5][None], k[7 * i:7 * i + 7][None],
                                    v[7 * i:7 * i + 7][None], causal=True)[0]
        torch.testing.assert_close(out[5 * i:5 * i + 5], alone)
