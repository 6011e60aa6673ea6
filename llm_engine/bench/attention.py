"""Fused attention, forward and forward+backward: TFLOP/s.

Cases on CUDA (bf16): seqlen {512 … 16384} with batch × seqlen = 16384 tokens,
head_dim {64, 128} with heads × head_dim = 2048, causal and not. FLOPs counted
as 4·B·H·T²·D for the forward and 2.5× that for the backward (so 3.5× for
forward+backward), halved when causal. Implementations:

- ``llm_engine``: ``flash_attention`` (Triton, this engine);
- ``sdpa-flash``, ``sdpa-efficient``, ``sdpa-cudnn``, ``sdpa-math``:
  ``F.scaled_dot_product_attention`` restricted to one backend with
  ``torch.nn.attention.sdpa_kernel`` (``sdpa-flash`` is PyTorch's build of
  FlashAttention-2; ``sdpa-math`` only where its materialised scores fit the
  memory cap);
- ``flash-attn`` (FlashAttention-2 package) and ``flash-attn-3`` (its Hopper
  interface) when importable; a row with a note says when not.

A second family of cases is the model's own use: SmolLM2's attention shape (9
query heads over 3 K/V heads, head_dim 64), causal, 16384 tokens packed as
ragged sequences of lengths uniform in [seqlen/2, seqlen] (``seqlen`` is the
longest), through ``flash_attention_varlen``; FLOPs count each sequence's own
length. The references there are ``flash-attn``'s varlen function when
importable and ``sdpa-<backend> (padded)``: the batch padded to the longest
sequence and K/V heads repeated (both timed) before one dense SDPA call.

Each row's ``rel_err`` is against an fp32 reference computed a few heads at a
time (materialised scores): the output for forward rows, the concatenated
dq/dk/dv for forward+backward rows. On CPU (quick) one tiny shape runs: the
Triton kernel under ``TRITON_INTERPRET=1``, else the engine's CPU path (the
PyTorch reference); neither is a speed figure for the kernel.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from llm_engine.bench.common import INTERPRETER_NOTE, OURS, Ceilings, Row, rel_error, time_ms
from llm_engine.kernels._utils import interpreting
from llm_engine.kernels.attention import (
    attention_reference,
    attention_varlen_reference,
    flash_attention,
    flash_attention_varlen,
)

SUITE = "attention"
TOKENS = 16384
HIDDEN = 2048
MATH_SCORES_CAP = 1 << 30  # sdpa-math materialises batch·heads·T² scores
REFERENCE_CHUNK = 1 << 28  # scores per reference chunk (fp32: 1 GiB)
VARLEN_HEADS, VARLEN_KV_HEADS, VARLEN_HEAD_DIM = 9, 3, 64  # SmolLM2-135M

Attn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, bool], torch.Tensor]


def _cases(device: str, quick: bool) -> list[tuple[int, int, int, int, bool]]:
    """(batch, seqlen, heads, head_dim, causal)."""
    if torch.device(device).type != "cuda":
        return [(1, 48, 2, 32, True)]
    seqlens = (1024, 4096) if quick else (512, 1024, 2048, 4096, 8192, 16384)
    dims = (128,) if quick else (64, 128)
    return [(TOKENS // t, t, HIDDEN // d, d, causal)
            for d in dims for causal in (True, False) for t in seqlens]


def _sdpa(backend: SDPBackend) -> Attn:
    def attn(q, k, v, causal):
        with sdpa_kernel([backend]):
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                 v.transpose(1, 2), is_causal=causal)
        return out.transpose(1, 2)
    return attn


def _optional_impls() -> list[tuple[str, Attn | None, str]]:
    """(name, function or None, note) for the flash-attn packages."""
    impls: list[tuple[str, Attn | None, str]] = []
    try:
        from flash_attn import flash_attn_func
        impls.append(("flash-attn", lambda q, k, v, c: flash_attn_func(q, k, v, causal=c),
                      "FlashAttention-2 package"))
    except ImportError as e:
        impls.append(("flash-attn", None, f"flash-attn not installed ({e}); sdpa-flash is "
                                          "PyTorch's build of FlashAttention-2"))
    try:
        from flash_attn_interface import flash_attn_func as fa3

        def attn3(q, k, v, c):
            out = fa3(q, k, v, causal=c)
            return out[0] if isinstance(out, tuple) else out
        impls.append(("flash-attn-3", attn3, "FlashAttention-3 (Hopper)"))
    except ImportError as e:
        impls.append(("flash-attn-3", None, f"flash-attn-3 not installed ({e})"))
    return impls


def _reference(q, k, v, grad_out, causal):
    """fp32 output and dq/dk/dv, computed a few (batch, head) slices at a time."""
    batch, seqlen, heads, _ = q.shape
    per_chunk = max(1, REFERENCE_CHUNK // (seqlen * seqlen))
    out = torch.empty(q.shape, device=q.device, dtype=torch.float32)
    grads = [torch.empty(t.shape, device=q.device, dtype=torch.float32) for t in (q, k, v)]
    for b in range(batch):
        for h in range(0, heads, per_chunk):
            sl = (slice(b, b + 1), slice(None), slice(h, h + per_chunk))
            qc, kc, vc = (t[sl].float().requires_grad_() for t in (q, k, v))
            oc = attention_reference(qc, kc, vc, causal)
            for g, gc in zip(grads, torch.autograd.grad(oc, (qc, kc, vc), grad_out[sl].float()),
                             strict=True):
                g[sl] = gc
            out[sl] = oc.detach()
    return out, torch.cat([g.flatten() for g in grads])


def _measure(name, attn, q, k, v, grad_out, causal, ref_out, ref_grads, flops, case, params,
             device, quick, note) -> Iterator[Row]:
    """A forward row and a forward+backward row for one implementation."""
    def fwd():
        return attn(q, k, v, causal)

    def fwd_bwd():
        return torch.autograd.grad(attn(q, k, v, causal), (q, k, v), grad_out)

    for mode, fn, mode_flops in (("fwd", fwd, flops), ("fwd+bwd", fwd_bwd, 3.5 * flops)):
        row_case = f"{mode} {case}"
        try:
            result = fn()
            err = (rel_error(result, ref_out) if mode == "fwd"
                   else rel_error(torch.cat([g.flatten() for g in result]), ref_grads))
            del result
            ms = time_ms(fn, device, quick=quick)
        except (RuntimeError, torch.OutOfMemoryError) as e:
            first = " ".join(str(e).split())[:200]
            yield Row(SUITE, row_case, name, "TFLOP/s", None, params=params,
                      note=f"failed: {type(e).__name__}: {first}")
            continue
        yield Row(SUITE, row_case, name, "TFLOP/s", mode_flops / (ms * 1e-3) / 1e12, ms=ms,
                  rel_err=err, params=params, note=note)


def iter_rows(device: str, quick: bool, ceilings: Ceilings) -> Iterator[Row]:
    """Rows one at a time, each measured row with its fraction of the matmul ceiling."""
    for row in _rows(device, quick):
        if row.value is not None and ceilings is not None:
            row.ceiling_frac = row.value / ceilings.matmul_tflops
        yield row


def _rows(device: str, quick: bool) -> Iterator[Row]:
    cuda = torch.device(device).type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    if cuda or interpreting():
        ours: Attn = lambda q, k, v, c: flash_attention(q, k, v, causal=c)  # noqa: E731
        ours_note = "" if cuda else INTERPRETER_NOTE
    else:
        ours = lambda q, k, v, c: attention_reference(q, k, v, causal=c)  # noqa: E731
        ours_note = "CPU: the engine's PyTorch path (attention_reference), not the kernel"
    sdpa = [("sdpa-flash", SDPBackend.FLASH_ATTENTION), ("sdpa-efficient",
            SDPBackend.EFFICIENT_ATTENTION), ("sdpa-cudnn", SDPBackend.CUDNN_ATTENTION),
            ("sdpa-math", SDPBackend.MATH)]
    optional = _optional_impls() if cuda else [("flash-attn", None, "flash-attn needs CUDA")]

    for batch, seqlen, heads, head_dim, causal in _cases(device, quick):
        case = f"d{head_dim} {'causal' if causal else 'full'} T={seqlen}"
        params = {"seqlen": seqlen, "head_dim": head_dim, "causal": int(causal)}
        flops = 4 * batch * heads * seqlen * seqlen * head_dim / (2 if causal else 1)
        shape = (batch, seqlen, heads, head_dim)
        q, k, v = (torch.randn(shape, device=device, dtype=dtype, requires_grad=True)
                   for _ in range(3))
        grad_out = torch.randn(shape, device=device, dtype=dtype)
        ref_out, ref_grads = _reference(q.detach(), k.detach(), v.detach(), grad_out, causal)
        common = (q, k, v, grad_out, causal, ref_out, ref_grads, flops, case, params, device,
                  quick)

        yield from _measure(OURS, ours, *common, ours_note)
        for name, backend in sdpa:
            if backend == SDPBackend.MATH and batch * heads * seqlen * seqlen > MATH_SCORES_CAP:
                for mode in ("fwd", "fwd+bwd"):
                    yield Row(SUITE, f"{mode} {case}", name, "TFLOP/s", None, params=params,
                              note=f"skipped: {batch * heads * seqlen * seqlen:.2e} materialised "
                                   f"scores exceed the cap of {MATH_SCORES_CAP:.2e}")
                continue
            yield from _measure(name, _sdpa(backend), *common, f"sdpa_kernel([{backend.name}])")
        for name, attn, note in optional:
            if attn is None:
                for mode in ("fwd", "fwd+bwd"):
                    yield Row(SUITE, f"{mode} {case}", name, "TFLOP/s", None, params=params,
                              note=note)
                continue
            yield from _measure(name, attn, *common, note)
        del q, k, v, grad_out, ref_out, ref_grads, common
        if cuda:
            torch.cuda.empty_cache()
    yield from _varlen_rows(device, quick, dtype, ours_note, sdpa)


def _varlen_lengths(max_len: int, tokens: int, seed: int = 0) -> list[int]:
    """Ragged lengths uniform in [max_len/2, max_len] summing to ``tokens`` (first is max_len)."""
    gen = torch.Generator().manual_seed(seed)
    lengths = [max_len]
    while sum(lengths) < tokens:
        lengths.append(int(torch.randint(max_len // 2, max_len + 1, (1,), generator=gen)))
    lengths[-1] -= sum(lengths) - tokens
    return [n for n in lengths if n > 0]


def _padded_sdpa(backend: SDPBackend, lengths: list[int], device: str) -> Attn:
    """Dense SDPA over the batch padded to the longest sequence (right padding keeps
    causal outputs of real tokens exact); K/V heads repeated for the dense kernels."""
    max_len = max(lengths)
    idx = torch.cat([torch.arange(n) + i * max_len for i, n in enumerate(lengths)]).to(device)
    dense = _sdpa(backend)

    def pad(x: torch.Tensor) -> torch.Tensor:
        out = x.new_zeros(len(lengths) * max_len, *x.shape[1:]).index_copy(0, idx, x)
        return out.view(len(lengths), max_len, *x.shape[1:])

    def attn(q, k, v, causal):
        group = q.shape[1] // k.shape[1]
        k, v = (t.repeat_interleave(group, dim=1) for t in (k, v))
        out = dense(pad(q), pad(k), pad(v), causal)
        return out.reshape(-1, *q.shape[1:]).index_select(0, idx)
    return attn


def _varlen_rows(device: str, quick: bool, dtype: torch.dtype, ours_note: str,
                 sdpa: list[tuple[str, SDPBackend]]) -> Iterator[Row]:
    cuda = torch.device(device).type == "cuda"
    if cuda:
        max_lens = (2048,) if quick else (512, 1024, 2048, 4096, 8192)
        tokens = TOKENS
    else:
        max_lens, tokens = (24,), 40
    try:
        from flash_attn import flash_attn_varlen_func
        flash_note = "FlashAttention-2 package, varlen"
    except ImportError as e:
        flash_attn_varlen_func = None
        flash_note = f"flash-attn not installed ({e})"
    for max_len in max_lens:
        lengths = _varlen_lengths(max_len, tokens)
        cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
        cu[1:] = torch.tensor(lengths).cumsum(0)
        cu = cu.to(device)
        case = f"varlen smollm2 h9/3 d64 causal max={max_len}"
        params = {"seqlen": max_len, "head_dim": VARLEN_HEAD_DIM, "causal": 1}
        flops = sum(4 * VARLEN_HEADS * n * n * VARLEN_HEAD_DIM / 2 for n in lengths)
        total = sum(lengths)
        q = torch.randn(total, VARLEN_HEADS, VARLEN_HEAD_DIM, device=device, dtype=dtype,
                        requires_grad=True)
        k, v = (torch.randn(total, VARLEN_KV_HEADS, VARLEN_HEAD_DIM, device=device, dtype=dtype,
                            requires_grad=True) for _ in range(2))
        grad_out = torch.randn_like(q)
        varlen_args = (cu, cu, max_len, max_len)
        q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
        ref = attention_varlen_reference(q32, k32, v32, *varlen_args, causal=True)
        ref_grads = torch.autograd.grad(ref, (q32, k32, v32), grad_out.float())
        ref_grads = torch.cat([g.flatten() for g in ref_grads])
        ref = ref.detach()
        del q32, k32, v32
        common = (q, k, v, grad_out, True, ref, ref_grads, flops, case, params, device, quick)

        if cuda or interpreting():
            def ours(q, k, v, c, a=varlen_args):
                return flash_attention_varlen(q, k, v, *a, causal=c, check_cu_seqlens=False)
        else:
            def ours(q, k, v, c, a=varlen_args):
                return attention_varlen_reference(q, k, v, *a, causal=c)
        yield from _measure(OURS, ours, *common, ours_note)
        for name, backend in sdpa:
            scores = len(lengths) * VARLEN_HEADS * max_len * max_len
            if backend == SDPBackend.MATH and scores > MATH_SCORES_CAP:
                for mode in ("fwd", "fwd+bwd"):
                    yield Row(SUITE, f"{mode} {case}", f"{name} (padded)", "TFLOP/s", None,
                              params=params, note=f"skipped: {scores:.2e} materialised scores "
                                                  f"exceed the cap of {MATH_SCORES_CAP:.2e}")
                continue
            yield from _measure(f"{name} (padded)", _padded_sdpa(backend, lengths, device),
                                *common, f"sdpa_kernel([{backend.name}]) on the padded batch")
        if flash_attn_varlen_func is None:
            for mode in ("fwd", "fwd+bwd"):
                yield Row(SUITE, f"{mode} {case}", "flash-attn", "TFLOP/s", None, params=params,
                          note=flash_note)
        else:
            def flash(q, k, v, c, a=varlen_args):
                return flash_attn_varlen_func(q, k, v, *a, causal=c)
            yield from _measure("flash-attn", flash, *common, flash_note)
        del q, k, v, grad_out, ref, ref_grads, common
        if cuda:
            torch.cuda.empty_cache()


def run(device: str, quick: bool, ceilings: Ceilings) -> list[Row]:
    """Rows for every case and implementation (see the module docstring)."""
    return list(iter_rows(device, quick, ceilings))
