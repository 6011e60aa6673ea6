"""Weight-only quantized GEMM: ``x @ W.T`` with int8 or int4 weights and group scales.

``W (N, K)`` is stored as integer levels ``q`` with one ``scale`` and one ``offset`` per
group of ``group_size`` consecutive values of a row: ``W[n, k] = q[n, k] * scale[n, g] +
offset[n, g]`` with ``g = k // group_size``. That covers GGUF's Q8_0 (int8, offset 0),
Q4_0 (uint4, offset ``-8 * scale``) and Q4_1 (uint4, offset = the block's min).

Layouts
- ``bits=8``: ``qweight (N, K)`` int8.
- ``bits=4``: ``qweight (N, K // 2)`` uint8, byte ``j`` of a row holding ``q[n, j]`` in
  its low nibble and ``q[n, j + K // 2]`` in its high nibble (so both halves of a tile
  unpack with a mask or a shift, no interleaving).
- ``scales, offsets (N, K // group_size)`` fp16/bf16/fp32.

The kernel dequantizes a ``(BLOCK_K, BLOCK_N)`` tile of ``W.T`` in registers (in the
activations' dtype) and feeds ``tl.dot`` with fp32 accumulation. For few rows (decode),
``split_k`` programs share the ``K`` loop of each output tile and write fp32 partial
sums that are added in a fixed order (no atomics: the same result every run).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import FLOAT_DTYPES, check_tensor, check_triton_device, interpreting


@triton.jit
def _quant_matmul_kernel(
    X, Q, S, O, P,
    M, N, K, K_Q, n_groups, k_per_split,
    stride_xm, stride_qn, stride_sn, stride_ps, stride_pm,
    BITS: tl.constexpr, HALVES: tl.constexpr, GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_s = tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok = rm < M
    n_ok = rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # K_Q: stored columns of q per row (K for int8, K // 2 for int4).
    k_begin = pid_s * k_per_split
    k_end = tl.minimum(k_begin + k_per_split, K_Q)
    for k0 in range(k_begin, k_end, BLOCK_K):
        kk = k0 + rk
        k_ok = kk < k_end
        q = tl.load(Q + rn[None, :] * stride_qn + kk[:, None],
                    mask=k_ok[:, None] & n_ok[None, :], other=0)
        for h in tl.static_range(HALVES):
            if BITS == 8:
                level = q.to(tl.float32)
            elif h == 0:
                level = (q & 0xF).to(tl.float32)
            else:
                level = ((q >> 4) & 0xF).to(tl.float32)
            col = kk + h * K_Q  # the weight's column of this level
            g = col // GROUP
            s = tl.load(S + rn[None, :] * stride_sn + g[:, None],
                        mask=k_ok[:, None] & n_ok[None, :], other=0.0).to(tl.float32)
            o = tl.load(O + rn[None, :] * stride_sn + g[:, None],
                        mask=k_ok[:, None] & n_ok[None, :], other=0.0).to(tl.float32)
            w = level * s + o  # (BLOCK_K, BLOCK_N) of W.T
            x = tl.load(X + rm[:, None] * stride_xm + col[None, :],
                        mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            acc += tl.dot(x, w.to(x.dtype))
    tl.store(P + pid_s * stride_ps + rm[:, None] * stride_pm + rn[None, :], acc,
             mask=m_ok[:, None] & n_ok[None, :])


def _check(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor,
           bits: int, group_size: int) -> tuple[int, int, int]:
    check_tensor("x", x, dtypes=FLOAT_DTYPES, ndim=2)
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits!r}")
    check_tensor("qweight", qweight, dtypes=(torch.int8,) if bits == 8 else (torch.uint8,),
                 ndim=2, device=x.device)
    M, K = x.shape
    N = qweight.shape[0]
    if not isinstance(group_size, int) or group_size <= 0 or K % group_size:
        raise ValueError(f"group_size must be a positive divisor of K={K}, got {group_size!r}")
    if bits == 4 and (K % 2 or (K // 2) % group_size):
        raise ValueError(f"int4 weights need K // 2 a multiple of group_size {group_size}, "
                         f"got K={K}")
    if qweight.shape[1] != K * bits // 8:
        raise ValueError(f"qweight must be (N, {K * bits // 8}) for K={K} and {bits}-bit "
                         f"weights, got {tuple(qweight.shape)}")
    for name, t in (("scales", scales), ("offsets", offsets)):
        check_tensor(name, t, dtypes=FLOAT_DTYPES, ndim=2, device=x.device)
        if t.shape != (N, K // group_size):
            raise ValueError(f"{name} must be (N, K // group_size) = {(N, K // group_size)}, "
                             f"got {tuple(t.shape)}")
    return M, N, K


def launch_blocks(rows: int) -> tuple[int, int, int]:
    """``(BLOCK_M, BLOCK_N, BLOCK_K)`` of a launch for ``rows`` rows of ``x``."""
    if interpreting():
        return 16, 16, 16
    return (16 if rows <= 16 else 64), 64, 64


def quant_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                 offsets: torch.Tensor, bits: int, group_size: int = 32,
                 split_k: int | None = None) -> torch.Tensor:
    """``x (M, K) @ W.T -> (M, N)`` in ``x``'s dtype (fp16/bf16/fp32), ``W`` as described
    in the module docstring. ``split_k``: programs per output tile along ``K`` (default:
    more for fewer rows)."""
    M, N, K = _check(x, qweight, scales, offsets, bits, group_size)
    check_triton_device("x", x)
    x = x.contiguous()
    qweight, scales, offsets = qweight.contiguous(), scales.contiguous(), offsets.contiguous()
    k_q = qweight.shape[1]
    block_m, block_n, block_k = launch_blocks(M)
    if split_k is None:
        split_k = 1 if M > 64 or interpreting() else max(1, min(8, k_q // (4 * block_k)))
    if not isinstance(split_k, int) or split_k < 1:
        raise ValueError(f"split_k must be a positive int, got {split_k!r}")
    k_per_split = triton.cdiv(triton.cdiv(k_q, split_k), block_k) * block_k
    split_k = triton.cdiv(k_q, k_per_split)
    partial = torch.empty(split_k, M, N, device=x.device, dtype=torch.float32)
    if M and N:
        grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n), split_k)
        _quant_matmul_kernel[grid](
            x, qweight, scales, offsets, partial,
            M, N, K, k_q, K // group_size, k_per_split,
            x.stride(0), qweight.stride(0), scales.stride(0), partial.stride(0),
            partial.stride(1),
            BITS=bits, HALVES=8 // bits, GROUP=group_size, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        )
    out = partial[0] if split_k == 1 else partial.sum(0)
    return out.to(x.dtype)


def dequantize_reference(qweight: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor,
                         bits: int, group_size: int = 32) -> torch.Tensor:
    """The fp32 ``W (N, K)`` of the layout in the module docstring."""
    if bits == 8:
        q = qweight.to(torch.float32)
    else:
        q = torch.cat([qweight & 0xF, qweight >> 4], dim=1).to(torch.float32)
    g = torch.arange(q.shape[1], device=q.device) // group_size
    return q * scales.float()[:, g] + offsets.float()[:, g]


def quant_matmul_reference(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                           offsets: torch.Tensor, bits: int, group_size: int = 32) -> torch.Tensor:
    """Dequantize, then an fp32 matmul; the result in ``x``'s dtype."""
    _check(x, qweight, scales, offsets, bits, group_size)
    w = dequantize_reference(qweight, scales, offsets, bits, group_size)
    return (x.float() @ w.T).to(x.dtype)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Levels ``q (N, K)`` in [0, 15] -> the int4 layout ``(N, K // 2)`` uint8."""
    half = q.shape[1] // 2
    return (q[:, :half] | (q[:, half:] << 4)).to(torch.uint8)
