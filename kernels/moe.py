"""Mixture of SwiGLU experts: top-k routing, a fused grouped-GEMM kernel, its reference.

Each token goes to ``top_k`` of ``E`` experts; expert ``e`` computes
``down[e] @ (silu(gate[e] @ x) * (up[e] @ x))`` and the token's output is the sum of
its experts' outputs times their routing weights.

The Triton path (:func:`fused_moe`) groups the ``T·top_k`` (token, expert) pairs by
expert, each expert's run padded to a multiple of ``BLOCK_M`` rows, so every row block
of the grouped problem belongs to one expert. Two launches cover all experts at once:

1. gate/up: each program multiplies a block of gathered token rows by one expert's
   ``[gate | up]`` weight columns and writes ``silu(gate) * up`` (the SwiGLU fused);
2. down: each program multiplies a block of those rows by the expert's down weight,
   scales each row by its routing weight and writes it to the pair's slot of a
   ``(T, top_k, hidden)`` buffer, whose sum over ``top_k`` (a fixed order, so the
   result does not depend on which other tokens share the batch) is the output.

The grouping needs no host synchronisation: the grid covers the worst case
``T·top_k + E·(BLOCK_M - 1)`` rows and blocks past the last expert's run exit at once.
The plain-PyTorch :func:`moe_reference` loops over the experts that have tokens.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import check_tensor, check_triton_device, interpreting
from .reference.moe import _DTYPES, _check_moe, moe_reference, route_topk

__all__ = ["fused_moe", "moe_reference", "route_topk"]


# --------------------------------------------------------------------------- Triton


@triton.jit
def _block_rows(pair_ptr, pid_m, num_pairs, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Row offsets of row block ``pid_m`` in the grouped pairs, the pair of each row,
    which rows hold a pair (not padding), and this program's column offsets."""
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(pair_ptr + offs_m)
    return offs_m, pair, pair < num_pairs, tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)


@triton.jit
def _load_w_tile(w_base, offs_n, stride_wn, offs_k, col_ok, k_ok):
    """The (BLOCK_K, BLOCK_N) tile ``w[offs_n, offs_k].T`` of an expert's row-major
    weight; out-of-range entries are zero."""
    return tl.load(w_base + offs_n[None, :] * stride_wn + offs_k[:, None],
                   mask=col_ok[None, :] & k_ok[:, None], other=0.0)


@triton.jit
def _expert_matmul(a_ptr, a_rows, stride_a, row_ok, w_base, offs_n, col_ok, stride_wn, K,
                   up_offset, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr, GATED: tl.constexpr, IN_PREC: tl.constexpr):
    """``a[a_rows] @ w[offs_n].T`` over K in fp32; with GATED also ``a[a_rows] @
    w[offs_n + up_offset].T`` from the same tiles of ``a`` (zeros without)."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        a = tl.load(a_ptr + a_rows[:, None].to(tl.int64) * stride_a + offs_k[None, :],
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = _load_w_tile(w_base, offs_n, stride_wn, offs_k, col_ok, k_ok)
        if GATED:
            wu = _load_w_tile(w_base, offs_n + up_offset, stride_wn, offs_k, col_ok, k_ok)
            acc = tl.dot(a, w, acc, input_precision=IN_PREC)
            up = tl.dot(a, wu, up, input_precision=IN_PREC)
        else:
            acc = tl.dot(a, w, acc, input_precision=IN_PREC)
    return acc, up


@triton.jit
def _moe_gate_up_kernel(
    x_ptr, w_ptr, h_ptr, pair_ptr, block_expert_ptr,
    hidden, width, top_k, num_pairs,
    stride_xt, stride_we, stride_wn, stride_ht,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    IN_PREC: tl.constexpr,
):
    """Rows of one expert's run (gathered tokens) times its gate and up columns;
    writes ``silu(gate) * up`` for columns ``[pid_n·BLOCK_N, +BLOCK_N)``."""
    pid_m = tl.program_id(0)
    expert = tl.load(block_expert_ptr + pid_m)
    if expert < 0:
        return
    offs_m, pair, row_ok, offs_n = _block_rows(pair_ptr, pid_m, num_pairs, BLOCK_M, BLOCK_N)
    token = tl.where(row_ok, pair // top_k, 0)
    col_ok = offs_n < width
    gate, up = _expert_matmul(x_ptr, token, stride_xt, row_ok,
                              w_ptr + expert.to(tl.int64) * stride_we, offs_n, col_ok, stride_wn,
                              hidden, width, BLOCK_M, BLOCK_N, BLOCK_K, True, IN_PREC)
    h = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(h_ptr + offs_m[:, None].to(tl.int64) * stride_ht + offs_n[None, :],
             h.to(h_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _moe_down_kernel(
    h_ptr, w_ptr, out_ptr, pair_ptr, block_expert_ptr, weight_ptr,
    hidden, width, num_pairs,
    stride_ht, stride_we, stride_wn, stride_ot,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    IN_PREC: tl.constexpr,
):
    """Rows of ``silu(gate) * up`` times one expert's down columns, each row scaled by
    its routing weight and written to its (token, slot) row of the output buffer."""
    pid_m = tl.program_id(0)
    expert = tl.load(block_expert_ptr + pid_m)
    if expert < 0:
        return
    offs_m, pair, row_ok, offs_n = _block_rows(pair_ptr, pid_m, num_pairs, BLOCK_M, BLOCK_N)
    col_ok = offs_n < hidden
    acc, _ = _expert_matmul(h_ptr, offs_m, stride_ht, row_ok,
                            w_ptr + expert.to(tl.int64) * stride_we, offs_n, col_ok, stride_wn,
                            width, 0, BLOCK_M, BLOCK_N, BLOCK_K, False, IN_PREC)
    rw = tl.load(weight_ptr + tl.where(row_ok, pair, 0), mask=row_ok, other=0.0).to(tl.float32)
    acc = acc * rw[:, None]
    safe = tl.where(row_ok, pair, 0).to(tl.int64)
    tl.store(out_ptr + safe[:, None] * stride_ot + offs_n[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def _group_by_expert(experts: torch.Tensor, num_experts: int, block_m: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Pair ids sorted by expert, each expert's run padded to a multiple of ``block_m``
    (padding: ``num_pairs``), and the expert of each row block (-1 past the last run).
    Sized for the worst case, so nothing is read back to the host."""
    flat = experts.reshape(-1)
    num_pairs = flat.numel()
    device = flat.device
    max_rows = num_pairs + num_experts * (block_m - 1)
    max_rows = triton.cdiv(max_rows, block_m) * block_m
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts)
    padded = (counts + block_m - 1) // block_m * block_m
    run_start = torch.cumsum(padded, 0) - padded  # first row of each expert's run
    rank_start = torch.cumsum(counts, 0) - counts  # first sorted pair of each expert
    sorted_expert = flat[order]
    rank = torch.arange(num_pairs, device=device)
    dest = run_start[sorted_expert] + (rank - rank_start[sorted_expert])
    pairs = torch.full((max_rows,), num_pairs, dtype=torch.int32, device=device)
    pairs[dest] = order.to(torch.int32)
    block_first_row = torch.arange(0, max_rows, block_m, device=device)
    run_end = run_start + padded
    block_expert = torch.searchsorted(run_end, block_first_row, right=True)
    block_expert = torch.where(block_expert < num_experts, block_expert, -1).to(torch.int32)
    return pairs, block_expert


def fused_moe(x: torch.Tensor, up_proj: torch.Tensor, down_proj: torch.Tensor,
              weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    """Mixture of SwiGLU experts in two grouped-GEMM launches (Triton); same contract as
    :func:`moe_reference`: ``x (T, hidden)`` fp32/fp16/bf16, ``up_proj (E, 2·width, hidden)``,
    ``down_proj (E, hidden, width)``, ``weights, experts (T, top_k)``. Inference only (no
    backward). Returns ``(T, hidden)`` in x's dtype."""
    check_tensor("x", x, dtypes=_DTYPES)
    tokens, hidden, width, num_experts = _check_moe(x, up_proj, down_proj, weights, experts)
    for name, t in (("x", x), ("up_proj", up_proj), ("down_proj", down_proj)):
        check_triton_device(name, t)
    x, up_proj, down_proj = x.contiguous(), up_proj.contiguous(), down_proj.contiguous()
    top_k = experts.shape[1]
    num_pairs = tokens * top_k
    if num_pairs == 0:
        return x.new_zeros(tokens, hidden)
    block_m, block_n, block_k = (16, 16, 16) if interpreting() else (64, 64, 32)
    pairs, block_expert = _group_by_expert(experts, num_experts, block_m)
    rows = pairs.numel()
    h = torch.empty(rows, width, dtype=x.dtype, device=x.device)
    prec = "ieee" if x.dtype == torch.float32 else "tf32"
    _moe_gate_up_kernel[(rows // block_m, triton.cdiv(width, block_n))](
        x, up_proj, h, pairs, block_expert, hidden, width, top_k, num_pairs,
        x.stride(0), up_proj.stride(0), up_proj.stride(1), h.stride(0),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, IN_PREC=prec,
    )
    partial = torch.empty(num_pairs, hidden, dtype=torch.float32, device=x.device)
    _moe_down_kernel[(rows // block_m, triton.cdiv(hidden, block_n))](
        h, down_proj, partial, pairs, block_expert, weights.contiguous().float(),
        hidden, width, num_pairs,
        h.stride(0), down_proj.stride(0), down_proj.stride(1), partial.stride(0),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, IN_PREC=prec,
    )
    return partial.view(tokens, top_k, hidden).sum(dim=1).to(x.dtype)
