"""Sliding-window attention: every kernel and CPU path against a dense fp64 banded softmax.

Query at position ``p`` sees keys at positions ``p - window < j <= p``. The Triton
kernels run in the interpreter on CPU (fp32/fp16), on odd shapes and ragged batches.
"""

from __future__ import annotations

import math

import pytest
import torch
from llm_engine.kernels.attention import (
    attention_varlen_reference,
    flash_attention,
    flash_attention_varlen,
)
from llm_engine.kernels.paged_attention import (
    paged_attention,
    paged_attention_reference,
    paged_prefill_attention,
    paged_prefill_attention_reference,
)
from testing_utils import assert_close, interpreter_or_cuda, run_compile_script

from llm_engine import ops

DEVICE = interpreter_or_cuda()


def banded(q, k, v, q_pos, window, scale):
    """fp64 attention of ``q (n, heads, d)`` at ``q_pos`` over ``k, v (m, kv_heads, d)``
    at positions 0..m-1, within the window."""
    group = q.shape[1] // k.shape[1]
    k = k.double().repeat_interleave(group, 1)
    v = v.double().repeat_interleave(group, 1)
    s = torch.einsum("qhd,khd->hqk", q.double(), k) * scale
    pos = torch.arange(k.shape[0], device=q.device)
    visible = (pos[None, :] <= q_pos[:, None]) & (pos[None, :] > q_pos[:, None] - window)
    p = torch.softmax(s.masked_fill(~visible, float("-inf")), -1)
    return torch.einsum("hqk,khd->qhd", p, v)


def packed(lengths, heads, kv_heads, d, dtype, requires_grad=False):
    total = sum(lengths)
    q, k, v = (torch.randn(total, h, d, device=DEVICE, dtype=dtype, requires_grad=requires_grad)
               for h in (heads, kv_heads, kv_heads))
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32,
                      device=DEVICE)
    return q, k, v, cu


def banded_varlen(q, k, v, cu, window, scale):
    b = cu.tolist()
    return torch.cat([banded(q[s:e], k[s:e], v[s:e], torch.arange(e - s, device=q.device),
                             window, scale) for s, e in zip(b, b[1:], strict=False)])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("lengths,window", [([37, 1, 20], 5), ([50], 17), ([9, 33], 1),
                                            ([31], 64)])
def test_varlen_kernel_and_references_match_banded_softmax(lengths, window, dtype) -> None:
    q, k, v, cu = packed(lengths, 6, 2, 32, dtype)
    scale = 32**-0.5
    ref = banded_varlen(q, k, v, cu, window, scale)
    out = flash_attention_varlen(q, k, v, cu, cu, max(lengths), max(lengths), window=window)
    assert_close(out, ref, dtype, what="flash_attention_varlen")
    assert_close(attention_varlen_reference(q, k, v, cu, cu, max(lengths), max(lengths),
                                            window=window), ref, dtype, what="reference")
    if dtype == torch.float32:  # the CPU path (SDPA with a banded mask)
        with ops.use(attention_varlen="sdpa"):
            sdpa = ops.attention_varlen(q.cpu(), k.cpu(), v.cpu(), cu.cpu(), cu.cpu(),
                                        max(lengths), max(lengths), window=window)
        assert_close(sdpa, ref.cpu(), dtype, what="sdpa")


def test_dense_kernel_gradients_match_the_reference_with_a_window() -> None:
    dtype = torch.float32
    q, k, v = (torch.randn(2, 29, h, 32, device=DEVICE, dtype=dtype, requires_grad=True)
               for h in (4, 2, 2))
    out = flash_attention(q, k, v, window=6)
    grad = torch.randn_like(out)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad)
    qr, kr, vr = (t.detach().double().requires_grad_() for t in (q, k, v))
    cu = torch.tensor([0, 29, 58], dtype=torch.int32, device=DEVICE)
    ref = attention_varlen_reference(qr.reshape(58, 4, 32), kr.reshape(58, 2, 32),
                                     vr.reshape(58, 2, 32), cu, cu, 29, 29, window=6)
    rq, rk, rv = torch.autograd.grad(ref.reshape(out.shape), (qr, kr, vr), grad.double())
    assert_close(out, ref.reshape(out.shape), dtype)
    for name, a, b in (("dq", dq, rq), ("dk", dk, rk), ("dv", dv, rv)):
        assert_close(a, b, dtype, grad=True, what=name)


def paged_setup(context_lens, block_size, kv_heads, d, dtype):
    num_blocks = sum(math.ceil(n / block_size) for n in context_lens) + 3
    k_cache = torch.randn(num_blocks, block_size, kv_heads, d, device=DEVICE).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, d, device=DEVICE).to(dtype)
    perm = torch.randperm(num_blocks).tolist()
    max_blocks = max(math.ceil(n / block_size) for n in context_lens) + 1
    tables = torch.full((len(context_lens), max_blocks), -1, dtype=torch.int32)
    used = 0
    for s, n in enumerate(context_lens):
        need = math.ceil(n / block_size)
        tables[s, :need] = torch.tensor(perm[used:used + need], dtype=torch.int32)
        used += need
    return k_cache, v_cache, tables.to(DEVICE)


def gather(cache, row, n):
    pos = torch.arange(n, device=cache.device)
    return cache[row.long()[pos // cache.shape[1]], pos % cache.shape[1]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("partition_size", [None, 32])
def test_paged_decode_with_a_window(dtype, partition_size) -> None:
    lens, window, heads, kv_heads, d = [1, 45, 100, 7], 19, 6, 2, 32
    k_cache, v_cache, tables = paged_setup(lens, 16, kv_heads, d, dtype)
    q = torch.randn(len(lens), heads, d, device=DEVICE).to(dtype)
    scale = d**-0.5
    ref = torch.stack([banded(q[i:i + 1], gather(k_cache, tables[i], n),
                              gather(v_cache, tables[i], n),
                              torch.tensor([n - 1], device=DEVICE), window, scale)[0]
                       for i, n in enumerate(lens)])
    ctx = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    out = paged_attention(q, k_cache, v_cache, tables, ctx, partition_size=partition_size,
                          window=window)
    assert_close(out, ref, dtype, what="paged_attention")
    assert_close(paged_attention_reference(q, k_cache, v_cache, tables, ctx, window=window),
                 ref, dtype, what="reference")
    if dtype == torch.float32:  # the C++ kernel
        with torch.inference_mode(), ops.use(paged_attention="cpp"):
            native = ops.paged_attention(q.cpu(), k_cache.cpu(), v_cache.cpu(), tables.cpu(),
                                         ctx.cpu(), window=window)
        assert_close(native, ref.cpu(), dtype, what="C++ paged decode")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_paged_prefill_with_a_window(dtype) -> None:
    lens, new, window, heads, kv_heads, d = [40, 23, 5], [17, 23, 1], 9, 4, 2, 32
    k_cache, v_cache, tables = paged_setup(lens, 8, kv_heads, d, dtype)
    q = torch.randn(sum(new), heads, d, device=DEVICE).to(dtype)
    cu = torch.tensor([0, *torch.tensor(new).cumsum(0).tolist()], dtype=torch.int32,
                      device=DEVICE)
    scale = d**-0.5
    refs, b = [], cu.tolist()
    for i, n in enumerate(lens):
        q_pos = torch.arange(n - new[i], n, device=DEVICE)
        refs.append(banded(q[b[i]:b[i + 1]], gather(k_cache, tables[i], n),
                           gather(v_cache, tables[i], n), q_pos, window, scale))
    ref = torch.cat(refs)
    ctx = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    out = paged_prefill_attention(q, k_cache, v_cache, tables, cu, ctx, max(new), window=window)
    assert_close(out, ref, dtype, what="paged_prefill_attention")
    assert_close(paged_prefill_attention_reference(q, k_cache, v_cache, tables, cu, ctx, max(new),
                                                   window=window), ref, dtype, what="reference")


def release_before(tables, skipped, block_size):
    """Tables with the blocks wholly before position ``skipped[i]`` set to -1, as a
    sliding-window engine releases them (``BlockManager.free_prefix_blocks``)."""
    out = tables.clone()
    for i, n in enumerate(skipped):
        out[i, :max(0, n) // block_size] = -1
    return out


@pytest.mark.parametrize("partition_size", [None, 32])
def test_paged_decode_never_reads_blocks_released_before_the_window(partition_size) -> None:
    lens, window, bs, heads, kv_heads, d = [1, 45, 100, 7, 64], 19, 8, 4, 2, 16
    k_cache, v_cache, tables = paged_setup(lens, bs, kv_heads, d, torch.float32)
    q = torch.randn(len(lens), heads, d, device=DEVICE)
    ctx = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    # The query at position n - 1 sees keys from n - window on.
    released = release_before(tables, [n - window for n in lens], bs)
    assert (released == -1).sum() > (tables == -1).sum()
    ref = paged_attention_reference(q, k_cache, v_cache, tables, ctx, window=window)
    out = paged_attention(q, k_cache, v_cache, released, ctx, partition_size=partition_size,
                          window=window)
    assert_close(out, ref, torch.float32, what="paged_attention")
    assert_close(paged_attention_reference(q, k_cache, v_cache, released, ctx, window=window),
                 ref, torch.float32, what="reference")
    with torch.inference_mode(), ops.use(paged_attention="cpp"):
        native = ops.paged_attention(q.cpu(), k_cache.cpu(), v_cache.cpu(), released.cpu(),
                                     ctx.cpu(), window=window)
        assert_close(native, ref.cpu(), torch.float32, what="C++ paged decode")
        # A released entry inside the window is still a clear error.
        inside = release_before(tables, [n - window + bs for n in lens], bs).cpu()
        with pytest.raises(ValueError, match=r"block_tables\[1, 3\] = -1"):
            ops.paged_attention(q.cpu(), k_cache.cpu(), v_cache.cpu(), inside, ctx.cpu(),
                                window=window)


def test_paged_prefill_never_reads_blocks_released_before_the_window() -> None:
    lens, new, window, bs, heads, kv_heads, d = [40, 23, 30], [17, 5, 1], 9, 4, 4, 2, 16
    k_cache, v_cache, tables = paged_setup(lens, bs, kv_heads, d, torch.float32)
    q = torch.randn(sum(new), heads, d, device=DEVICE)
    cu = torch.tensor([0, *torch.tensor(new).cumsum(0).tolist()], dtype=torch.int32,
                      device=DEVICE)
    ctx = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    # The first new query, at position n - m, sees keys from n - m - window + 1 on.
    released = release_before(tables, [n - m - window + 1 for n, m in zip(lens, new,
                                                                           strict=True)], bs)
    assert (released == -1).sum() > (tables == -1).sum()
    ref = paged_prefill_attention_reference(q, k_cache, v_cache, tables, cu, ctx, max(new),
                                            window=window)
    out = paged_prefill_attention(q, k_cache, v_cache, released, cu, ctx, max(new), window=window)
    assert_close(out, ref, torch.float32, what="paged_prefill_attention")
    assert_close(paged_prefill_attention_reference(q, k_cache, v_cache, released, cu, ctx,
                                                   max(new), window=window),
                 ref, torch.float32, what="reference")


@pytest.mark.parametrize("window", [0, -3, 2.5, True])
def test_bad_window_is_a_clear_error(window) -> None:
    q, k, v, cu = packed([4], 2, 2, 32, torch.float32)
    with pytest.raises(ValueError, match="window must be a positive int"):
        flash_attention_varlen(q, k, v, cu, cu, 4, 4, window=window)
    with pytest.raises(ValueError, match="window must be a positive int"):
        paged_attention_reference(q[:1], *paged_setup([4], 16, 2, 32, torch.float32)[:3],
                                  torch.tensor([4], dtype=torch.int32, device=DEVICE),
                                  window=window)
    with pytest.raises(ValueError, match="needs causal"):
        flash_attention_varlen(q, k, v, cu, cu, 4, 4, causal=False, window=3)


_COMPILE_WINDOWED_FOR_SM90 = r"""
import importlib
import os
os.environ["TRITON_INTERPRET"] = "0"
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

A = importlib.import_module("llm_engine.kernels.attention")
P = importlib.import_module("llm_engine.kernels.paged_attention")

INTS = ("seqlen_key", "group", "head_dim", "partition_size", "num_partitions")
FLOATS = ("qk_scale", "softmax_scale", "scale_log2")
POINTERS = {"CU_Q": "*i32", "CU_K": "*i32", "LSE": "*fp32", "bt_ptr": "*i32",
            "lens_ptr": "*i32", "cu_ptr": "*i32", "m_ptr": "*fp32", "l_ptr": "*fp32",
            "acc_ptr": "*fp32"}
bm, bn, warps, stages = A._TUNING["fwd"]["d64"][0]
KERNELS = (
    ("fwd", A._attn_fwd_kernel, dict(GROUP=3, HEAD_DIM=64, BLOCK_D=64, CAUSAL=True,
                                     DOT_PRECISION="tf32", BLOCK_M=bm, BLOCK_N=bn)),
    ("decode", P._paged_decode_kernel, dict(BLOCK_SIZE=16, GROUP_PAD=16, BLOCK_N=64, BLOCK_D=64,
                                            SPLIT=True, IN_PREC=None)),
    ("prefill", P._paged_prefill_kernel, dict(BLOCK_SIZE=16, BLOCK_M=128, BLOCK_N=64, BLOCK_D=64,
                                              IN_PREC=None)),
)
for name, fn, constexprs in KERNELS:
    signature = {}
    for param in fn.params:
        arg = param.name
        if param.is_constexpr:
            signature[arg] = "constexpr"
        elif arg.startswith("stride") or arg in INTS:
            signature[arg] = "i32"
        elif arg in FLOATS:
            signature[arg] = "fp32"
        else:
            signature[arg] = POINTERS.get(arg, "*bf16")
    compiled = triton.compile(ASTSource(fn, signature, {**constexprs, "WINDOW": 256}),
                              target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": warps, "num_stages": stages})
    assert compiled.asm["cubin"], name
    print(name, "ok")
"""


def test_windowed_kernels_compile_for_sm90_without_a_gpu() -> None:
    assert run_compile_script(_COMPILE_WINDOWED_FOR_SM90) == ["fwd", "ok", "decode", "ok", "prefill", "ok"]
