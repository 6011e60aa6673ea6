"""LayerNorm and RMSNorm with an optional fused residual add: Triton kernels and references.

``layer_norm(x, weight, bias, eps)`` computes ``(x - mean) / sqrt(var + eps) * weight + bias``
over the last dimension; ``rms_norm(x, weight, eps)`` computes
``x / sqrt(mean(x**2) + eps) * weight``. Given ``residual``, both first form
``h = x + residual`` (rounded to ``x``'s dtype, as the pre-norm transformer keeps it)
and return ``(norm(h), h)``.

Forward: a program normalises a tile of ``ROWS`` rows at once (several rows for
narrow hidden sizes, one for wide ones), accumulating in fp32 and saving the
per-row mean and rstd. Rows wider than the largest block are processed in
chunks, with a pass for the mean, one for the variance and one for the output.

Backward: a fixed number of programs (a few per SM) each walk a contiguous range
of rows, write ``dx`` (plus the gradient that arrived on ``h``), and keep their
share of ``dweight``/``dbias`` in registers; each program writes one partial row
and a second kernel sums the partials in a fixed order. No atomics, so the
gradients are identical from run to run.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import (
    FLOAT_DTYPES,
    check_tensor,
    check_triton_device,
    interpreting,
    sm_count,
    tuning_choices,
)
from .reference.layer_norm import layer_norm_reference, rms_norm_reference

__all__ = ["layer_norm", "layer_norm_reference", "rms_norm", "rms_norm_reference"]

# Widest row (in elements) normalised in one block; wider rows loop over chunks. The
# backward keeps more fp32 arrays per element live, so its block is narrower.
_MAX_FWD_BLOCK_N = 1024 if interpreting() else 16384
_MAX_BWD_BLOCK_N = 1024 if interpreting() else 8192
# A tile holds about this many elements when rows are narrow (several rows per tile).
_TILE_ELEMENTS = 4096
_MAX_ROWS = 128
# Backward programs: about this many tile elements per SM on CUDA, 1 to 8 programs
# per SM; the interpreter runs a handful.
_BWD_ELEMENTS_PER_SM = 16384
_INTERPRETER_BWD_PROGRAMS = 4


def _tuning_bench(kernel_call, quantiles):
    """Autotuning benchmark: shorter than Triton's default (25 ms warm-up, 100 ms of
    repeats per config), since every hidden size and variant is tuned on first use."""
    return triton.testing.do_bench(kernel_call, warmup=5, rep=25, quantiles=quantiles)


def _warp_configs() -> list[triton.Config]:
    if interpreting():
        return [triton.Config({}, num_warps=1)]
    return [triton.Config({}, num_warps=w) for w in (1, 2, 4, 8, 16, 32)]


def _prune_warps(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Keep warp counts that give each thread between 4 and 32 elements of the tile
    (8 or 16 under ``LLM_ENGINE_AUTOTUNE=quick``)."""
    tile = kwargs["ROWS"] * kwargs["BLOCK_N"]
    kept = [c for c in configs if 4 <= tile / (32 * c.num_warps) <= 32]
    kept = kept or [min(configs, key=lambda c: c.num_warps)]
    return tuning_choices(kept, lambda c: tile / (32 * c.num_warps) in (8, 16))


def _autotune_rows(extra_key: str):
    """The autotuning decorator of a row kernel: its warp count, tuned per hidden size,
    tile, norm kind, bias and ``extra_key`` (the kernel's other constexpr flag)."""
    return triton.autotune(
        configs=_warp_configs(),
        key=["N", "ROWS", "BLOCK_N", "IS_RMS", "HAS_BIAS", extra_key],
        prune_configs_by={"early_config_prune": _prune_warps},
        do_bench=_tuning_bench,
    )


@triton.jit
def _input_tile(x_rows, r_rows, h_rows, cols, mask, H, HAS_RESIDUAL: tl.constexpr):
    """A tile of the norm's input in fp32: x, or with a residual h = x + r, which is
    rounded to H's dtype and stored to ``h_rows`` first."""
    x = tl.load(x_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(r_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        h = (x + r).to(H.dtype.element_ty)
        tl.store(h_rows + cols[None, :], h, mask=mask)
        x = h.to(tl.float32)
    return x


@triton.jit
def _affine_store(Y, y_rows, xhat, W, B, cols, col_mask, mask, HAS_BIAS: tl.constexpr):
    """y = xhat * w (+ b) of a tile, stored in Y's dtype."""
    w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
    y = xhat * w[None, :]
    if HAS_BIAS:
        y += tl.load(B + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(y_rows + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)


@_autotune_rows("HAS_RESIDUAL")
@triton.jit
def _norm_fwd_kernel(
    X, R, W, B, Y, H, Mean, Rstd,
    stride_x, stride_r,
    n_rows, N, eps,
    IS_RMS: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    ONE_PASS: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * ROWS + tl.arange(0, ROWS)
    row_mask = rows < n_rows
    rows64 = rows.to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    x_rows = X + rows64[:, None] * stride_x
    y_rows = Y + rows64[:, None] * N
    # h_rows: where the norm's input is stored (with a residual) and read back (x itself
    # without one, when r_rows is unused).
    if HAS_RESIDUAL:
        r_rows = R + rows64[:, None] * stride_r
        h_rows = H + rows64[:, None] * N
    else:
        r_rows = x_rows
        h_rows = x_rows

    if ONE_PASS:
        col_mask = cols < N
        mask = row_mask[:, None] & col_mask[None, :]
        x = _input_tile(x_rows, r_rows, h_rows, cols, mask, H, HAS_RESIDUAL)
        if IS_RMS:
            rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / N + eps)
            xhat = x * rstd[:, None]
        else:
            mean = tl.sum(x, axis=1) / N
            xc = tl.where(mask, x - mean[:, None], 0.0)
            rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / N + eps)
            xhat = xc * rstd[:, None]
            tl.store(Mean + rows, mean, mask=row_mask)
        tl.store(Rstd + rows, rstd, mask=row_mask)
        _affine_store(Y, y_rows, xhat, W, B, cols, col_mask, mask, HAS_BIAS)
    else:
        # Pass 1: form h (stored once, re-read by the later passes) and sum x or x**2.
        acc = tl.zeros([ROWS, BLOCK_N], dtype=tl.float32)
        for start in range(0, N, BLOCK_N):
            c = start + cols
            mask = row_mask[:, None] & (c < N)[None, :]
            x = _input_tile(x_rows, r_rows, h_rows, c, mask, H, HAS_RESIDUAL)
            if IS_RMS:
                acc += x * x
            else:
                acc += x
        if HAS_RESIDUAL:
            # h was written by other threads of this program: make it visible.
            tl.debug_barrier()
        if IS_RMS:
            mean = tl.zeros([ROWS], dtype=tl.float32)
            rstd = 1.0 / tl.sqrt(tl.sum(acc, axis=1) / N + eps)
        else:
            mean = tl.sum(acc, axis=1) / N
            acc = tl.zeros([ROWS, BLOCK_N], dtype=tl.float32)
            for start in range(0, N, BLOCK_N):
                c = start + cols
                mask = row_mask[:, None] & (c < N)[None, :]
                x = tl.load(h_rows + c[None, :], mask=mask, other=0.0).to(tl.float32)
                xc = tl.where(mask, x - mean[:, None], 0.0)
                acc += xc * xc
            rstd = 1.0 / tl.sqrt(tl.sum(acc, axis=1) / N + eps)
            tl.store(Mean + rows, mean, mask=row_mask)
        tl.store(Rstd + rows, rstd, mask=row_mask)
        for start in range(0, N, BLOCK_N):
            c = start + cols
            col_mask = c < N
            mask = row_mask[:, None] & col_mask[None, :]
            x = tl.load(h_rows + c[None, :], mask=mask, other=0.0).to(tl.float32)
            _affine_store(Y, y_rows, (x - mean[:, None]) * rstd[:, None], W, B, c, col_mask, mask,
                          HAS_BIAS)


@triton.jit
def _bwd_tile_loads(X, DY, Mean, Rstd, rows, row_end, cols, col_mask, stride_x, N,
                    IS_RMS: tl.constexpr):
    """x and dy (in their own dtype), mean (zero for RMSNorm) and rstd of a tile of rows."""
    row_mask = rows < row_end
    rows64 = rows.to(tl.int64)
    mask = row_mask[:, None] & col_mask[None, :]
    x = tl.load(X + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
    dy = tl.load(DY + rows64[:, None] * N + cols[None, :], mask=mask, other=0.0)
    rstd = tl.load(Rstd + rows, mask=row_mask, other=0.0)
    mean = tl.zeros_like(rstd) if IS_RMS else tl.load(Mean + rows, mask=row_mask, other=0.0)
    return x, dy, mean, rstd


@_autotune_rows("HAS_DH")
@triton.jit
def _norm_bwd_kernel(
    DY, DH, X, W, Mean, Rstd, DX, DW_partial, DB_partial,
    stride_x, n_rows, N, rows_per_program,
    IS_RMS: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DH: tl.constexpr,
    ONE_PASS: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # X is the normalised input (h when a residual was added); DH, if present, is
    # the gradient that arrived on h and is added to the gradient flowing through
    # the norm. dW/dB partials of this program go to row `pid` of the partial buffers.
    pid = tl.program_id(0)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    cols = tl.arange(0, BLOCK_N)
    dw_row = DW_partial + pid.to(tl.int64) * N
    if HAS_BIAS:
        db_row = DB_partial + pid.to(tl.int64) * N

    if ONE_PASS:
        col_mask = cols < N
        w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
        dw_acc = tl.zeros([ROWS, BLOCK_N], dtype=tl.float32)
        db_acc = tl.zeros([ROWS, BLOCK_N], dtype=tl.float32)
        # The loads of the next tile are issued before this tile's math, so each
        # program keeps a tile of memory traffic in flight while it computes.
        x_next, dy_next, mean_next, rstd_next = _bwd_tile_loads(
            X, DY, Mean, Rstd, row_start + tl.arange(0, ROWS), row_end, cols, col_mask,
            stride_x, N, IS_RMS)
        for r0 in range(row_start, row_end, ROWS):
            rows = r0 + tl.arange(0, ROWS)
            row_mask = rows < row_end
            rows64 = rows.to(tl.int64)
            mask = row_mask[:, None] & col_mask[None, :]
            offs = rows64[:, None] * N + cols[None, :]
            x = x_next.to(tl.float32)
            dy = dy_next.to(tl.float32)
            mean = mean_next
            rstd = rstd_next
            x_next, dy_next, mean_next, rstd_next = _bwd_tile_loads(
                X, DY, Mean, Rstd, rows + ROWS, row_end, cols, col_mask, stride_x, N, IS_RMS)
            if HAS_DH:
                dh = tl.load(DH + offs, mask=mask, other=0.0).to(tl.float32)
            xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
            wdy = w[None, :] * dy
            c1 = tl.sum(xhat * wdy, axis=1) / N
            if IS_RMS:
                dx = (wdy - xhat * c1[:, None]) * rstd[:, None]
            else:
                c2 = tl.sum(wdy, axis=1) / N
                dx = (wdy - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
            if HAS_DH:
                dx += dh
            tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)
            dw_acc += dy * xhat
            if HAS_BIAS:
                db_acc += dy
        tl.store(dw_row + cols, tl.sum(dw_acc, axis=0), mask=col_mask)
        if HAS_BIAS:
            tl.store(db_row + cols, tl.sum(db_acc, axis=0), mask=col_mask)
    else:
        # Rows wider than a block: this program's partial rows live in memory and are
        # updated chunk by chunk (only by this program, so still no atomics).
        for start in range(0, N, BLOCK_N):
            c = start + cols
            zeros = tl.zeros([BLOCK_N], dtype=tl.float32)
            tl.store(dw_row + c, zeros, mask=c < N)
            if HAS_BIAS:
                tl.store(db_row + c, zeros, mask=c < N)
        tl.debug_barrier()
        for r0 in range(row_start, row_end, ROWS):
            rows = r0 + tl.arange(0, ROWS)
            row_mask = rows < row_end
            rows64 = rows.to(tl.int64)
            x_rows = X + rows64[:, None] * stride_x
            rstd = tl.load(Rstd + rows, mask=row_mask, other=0.0)
            if IS_RMS:
                mean = tl.zeros([ROWS], dtype=tl.float32)
            else:
                mean = tl.load(Mean + rows, mask=row_mask, other=0.0)
            c1_acc = tl.zeros([ROWS, BLOCK_N], dtype=tl.float32)
            c2_acc = tl.zeros([ROWS, BLOCK_N], dtype=tl.float32)
            for start in range(0, N, BLOCK_N):
                c = start + cols
                col_mask = c < N
                mask = row_mask[:, None] & col_mask[None, :]
                x = tl.load(x_rows + c[None, :], mask=mask, other=0.0).to(tl.float32)
                dy = tl.load(DY + rows64[:, None] * N + c[None, :], mask=mask,
                             other=0.0).to(tl.float32)
                w = tl.load(W + c, mask=col_mask, other=0.0).to(tl.float32)
                xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
                wdy = w[None, :] * dy
                c1_acc += xhat * wdy
                c2_acc += wdy
            c1 = tl.sum(c1_acc, axis=1) / N
            c2 = tl.zeros([ROWS], dtype=tl.float32) if IS_RMS else tl.sum(c2_acc, axis=1) / N
            for start in range(0, N, BLOCK_N):
                c = start + cols
                col_mask = c < N
                mask = row_mask[:, None] & col_mask[None, :]
                offs = rows64[:, None] * N + c[None, :]
                x = tl.load(x_rows + c[None, :], mask=mask, other=0.0).to(tl.float32)
                dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
                w = tl.load(W + c, mask=col_mask, other=0.0).to(tl.float32)
                xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
                wdy = w[None, :] * dy
                dx = (wdy - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
                if HAS_DH:
                    dx += tl.load(DH + offs, mask=mask, other=0.0).to(tl.float32)
                tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)
                dw = tl.load(dw_row + c, mask=col_mask, other=0.0)
                tl.store(dw_row + c, dw + tl.sum(dy * xhat, axis=0), mask=col_mask)
                if HAS_BIAS:
                    db = tl.load(db_row + c, mask=col_mask, other=0.0)
                    tl.store(db_row + c, db + tl.sum(dy, axis=0), mask=col_mask)
            # The next row re-reads the partial rows, possibly from other threads.
            tl.debug_barrier()


def _sum_configs() -> list[triton.Config]:
    if interpreting():
        return [triton.Config({"BLOCK_G": 64, "BLOCK_COLS": 32}, num_warps=1)]
    shapes = ((32, 128, 4), (64, 64, 4), (128, 32, 4), (256, 16, 8))
    return [triton.Config({"BLOCK_G": g, "BLOCK_COLS": c}, num_warps=w) for g, c, w in shapes]


@triton.jit
def _sum_columns(P, OUT, pid, G, N, BLOCK_G: tl.constexpr, BLOCK_COLS: tl.constexpr):
    cols = pid * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    col_mask = cols < N
    acc = tl.zeros([BLOCK_G, BLOCK_COLS], dtype=tl.float32)
    for g0 in range(0, G, BLOCK_G):
        g = g0 + tl.arange(0, BLOCK_G)
        mask = (g < G)[:, None] & col_mask[None, :]
        acc += tl.load(P + g.to(tl.int64)[:, None] * N + cols[None, :], mask=mask, other=0.0)
    tl.store(OUT + cols, tl.sum(acc, axis=0).to(OUT.dtype.element_ty), mask=col_mask)


def _prune_sum(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Every shape, or 64 x 64 tiles under ``LLM_ENGINE_AUTOTUNE=quick``."""
    return tuning_choices(configs, lambda c: c.kwargs["BLOCK_G"] == c.kwargs["BLOCK_COLS"] == 64)


@triton.autotune(configs=_sum_configs(), key=["G", "N", "HAS_BIAS"], do_bench=_tuning_bench,
                 prune_configs_by={"early_config_prune": _prune_sum})
@triton.jit
def _sum_partials_kernel(PW, PB, DW, DB, G, N, HAS_BIAS: tl.constexpr, BLOCK_G: tl.constexpr,
                         BLOCK_COLS: tl.constexpr):
    """DW[n] = sum over g of PW[g, n] in a fixed order; with a bias, the second row of
    the grid does the same for DB from PB (one launch for both)."""
    pid = tl.program_id(0)
    if HAS_BIAS:
        if tl.program_id(1) == 1:
            _sum_columns(PB, DB, pid, G, N, BLOCK_G, BLOCK_COLS)
        else:
            _sum_columns(PW, DW, pid, G, N, BLOCK_G, BLOCK_COLS)
    else:
        _sum_columns(PW, DW, pid, G, N, BLOCK_G, BLOCK_COLS)


def _block_n(n: int, max_block_n: int) -> int:
    return min(triton.next_power_of_2(n), max_block_n)


def _rows_per_tile(block_n: int) -> int:
    return max(1, min(_MAX_ROWS, _TILE_ELEMENTS // block_n))


def _num_bwd_programs(device: torch.device, tile: int) -> int:
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return max(1, min(8, _BWD_ELEMENTS_PER_SM // tile)) * sm_count(index)
    return _INTERPRETER_BWD_PROGRAMS


def _as_rows(t: torch.Tensor, n: int) -> torch.Tensor:
    """View ``t`` as ``(rows, n)`` with unit stride along ``n`` (copying only if needed)."""
    t2 = t.reshape(-1, n)
    if n > 1 and t2.stride(1) != 1:
        t2 = t2.contiguous()
    return t2


def _forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
             residual: torch.Tensor | None, eps: float, is_rms: bool):
    n = x.shape[-1]
    x2 = _as_rows(x, n)
    n_rows = x2.shape[0]
    r2 = _as_rows(residual, n) if residual is not None else None
    y = torch.empty((n_rows, n), dtype=x.dtype, device=x.device)
    h = torch.empty_like(y) if residual is not None else None
    mean = torch.empty(n_rows, dtype=torch.float32, device=x.device) if not is_rms else None
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    if n_rows > 0:
        block_n = _block_n(n, _MAX_FWD_BLOCK_N)
        one_pass = n <= block_n
        rows = _rows_per_tile(block_n) if one_pass else 1
        _norm_fwd_kernel[(triton.cdiv(n_rows, rows),)](
            x2, r2, weight, bias, y, h, mean, rstd,
            x2.stride(0), r2.stride(0) if r2 is not None else 0,
            n_rows, n, eps,
            IS_RMS=is_rms, HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None,
            ONE_PASS=one_pass, ROWS=rows, BLOCK_N=block_n,
        )
    saved = h if h is not None else x2
    return y, h, saved, mean, rstd


def _backward(dy: torch.Tensor, dh: torch.Tensor | None, saved: torch.Tensor,
              weight: torch.Tensor, has_bias: bool, mean: torch.Tensor | None,
              rstd: torch.Tensor, is_rms: bool):
    n_rows, n = saved.shape
    device = saved.device
    dx = torch.empty((n_rows, n), dtype=saved.dtype, device=device)
    dweight = torch.empty(n, dtype=weight.dtype, device=device)
    dbias = torch.empty(n, dtype=weight.dtype, device=device) if has_bias else None
    if n_rows == 0:
        dweight.zero_()
        if dbias is not None:
            dbias.zero_()
        return dx, dweight, dbias
    block_n = _block_n(n, _MAX_BWD_BLOCK_N)
    one_pass = n <= block_n
    rows = _rows_per_tile(block_n) if one_pass else 1
    programs = min(n_rows, _num_bwd_programs(device, rows * block_n))
    rows_per_program = triton.cdiv(n_rows, programs)
    programs = triton.cdiv(n_rows, rows_per_program)
    rows = min(rows, triton.next_power_of_2(rows_per_program))
    dw_partial = torch.empty((programs, n), dtype=torch.float32, device=device)
    db_partial = torch.empty((programs, n), dtype=torch.float32, device=device) if has_bias else None
    _norm_bwd_kernel[(programs,)](
        dy, dh, saved, weight, mean, rstd, dx, dw_partial, db_partial,
        saved.stride(0), n_rows, n, rows_per_program,
        IS_RMS=is_rms, HAS_BIAS=has_bias, HAS_DH=dh is not None,
        ONE_PASS=one_pass, ROWS=rows, BLOCK_N=block_n,
    )
    _sum_partials_kernel[lambda meta: (triton.cdiv(n, meta["BLOCK_COLS"]), 1 + has_bias)](
        dw_partial, db_partial, dweight, dbias, programs, n, HAS_BIAS=has_bias,
    )
    return dx, dweight, dbias


class _NormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, residual, eps, is_rms):
        y, h, saved, mean, rstd = _forward(x, weight, bias, residual, eps, is_rms)
        ctx.save_for_backward(saved, weight, mean, rstd)
        ctx.is_rms = is_rms
        ctx.has_bias = bias is not None
        ctx.has_residual = residual is not None
        ctx.x_shape = x.shape
        ctx.set_materialize_grads(False)
        y = y.view(x.shape)
        if residual is None:
            return y
        return y, h.view(x.shape)

    @staticmethod
    def backward(ctx, dy, dh=None):
        saved, weight, mean, rstd = ctx.saved_tensors
        n = saved.shape[1]
        if dy is None:
            dy = torch.zeros(saved.shape, dtype=saved.dtype, device=saved.device)
        dy = dy.reshape(-1, n).contiguous()
        if dh is not None:
            dh = dh.reshape(-1, n).contiguous()
        dx, dweight, dbias = _backward(dy, dh, saved, weight, ctx.has_bias, mean, rstd,
                                       ctx.is_rms)
        dx = dx.view(ctx.x_shape)
        need_x, need_w, need_b, need_r = ctx.needs_input_grad[:4]
        return (
            dx if need_x else None,
            dweight if need_w else None,
            dbias if need_b else None,
            dx if need_r and ctx.has_residual else None,
            None,
            None,
        )


def _check_inputs(x: object, weight: object, bias: object, residual: object, eps: object) -> None:
    check_tensor("x", x, dtypes=FLOAT_DTYPES)
    if x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError(f"x must have shape (..., hidden) with hidden >= 1, got {tuple(x.shape)}")
    check_triton_device("x", x)
    hidden = x.shape[-1]
    check_tensor("weight", weight, dtypes=FLOAT_DTYPES, ndim=1, device=x.device)
    if weight.shape[0] != hidden:
        raise ValueError(
            f"weight must have shape (hidden,) = ({hidden},) to match x {tuple(x.shape)}, "
            f"got {tuple(weight.shape)}"
        )
    if bias is not None:
        check_tensor("bias", bias, dtypes=(weight.dtype,), ndim=1, device=x.device)
        if bias.shape != weight.shape:
            raise ValueError(f"bias must have shape ({hidden},) like weight, got {tuple(bias.shape)}")
    if residual is not None:
        check_tensor("residual", residual, dtypes=(x.dtype,), device=x.device)
        if residual.shape != x.shape:
            raise ValueError(
                f"residual must have the shape of x {tuple(x.shape)}, got {tuple(residual.shape)}"
            )
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"eps must be a non-negative number, got {eps!r}")


def layer_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    residual: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """LayerNorm over the last dimension, with an optional fused residual add (Triton).

    x: (..., hidden) fp32/fp16/bf16, any number of leading dims.
    weight: (hidden,) fp32/fp16/bf16; bias: (hidden,) in weight's dtype, or None.
    residual: like x (same shape and dtype), or None.
    Returns y: like x; with ``residual`` the pair ``(y, h)`` where ``h = x + residual``
    (x's dtype) is what was normalised. Differentiable in x, weight, bias and residual;
    dweight/dbias come back in weight's dtype.
    """
    _check_inputs(x, weight, bias, residual, eps)
    return _NormFunction.apply(x, weight.contiguous(),
                               bias.contiguous() if bias is not None else None,
                               residual, float(eps), False)


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float = 1e-6,
    residual: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm over the last dimension, with an optional fused residual add (Triton).

    x: (..., hidden) fp32/fp16/bf16, any number of leading dims.
    weight: (hidden,) fp32/fp16/bf16. residual: like x (same shape and dtype), or None.
    Returns y = x / sqrt(mean(x**2) + eps) * weight, like x; with ``residual`` the pair
    ``(y, h)`` where ``h = x + residual`` (x's dtype) is what was normalised.
    Differentiable in x, weight and residual; dweight comes back in weight's dtype.
    """
    _check_inputs(x, weight, None, residual, eps)
    return _NormFunction.apply(x, weight.contiguous(), None, residual, float(eps), True)
