"""Decode attention over a paged KV cache: GB/s of K/V read.

Cases: batch {1, 16, 128} × context {512 … 32k} × head_dim {64, 128} in bf16 on
CUDA (32 query heads over 8 KV heads, 16-token blocks, shuffled block tables),
skipping cases whose K/V exceed a memory cap. Every sequence of a case has the
full context, so bytes read = batch × context × kv_heads × head_dim × 2 (K and V)
× 2 bytes. Implementations:

- ``llm_engine``: ``paged_attention`` (split-context GQA kernel);
- ``gather+sdpa``: gather K/V through the block table into contiguous tensors,
  then ``F.scaled_dot_product_attention`` (the gather is timed: it is what a
  dense kernel needs to read a paged cache); ``sdpa (pre-gathered)`` times SDPA
  alone on the already-gathered K/V, a bound that no paged cache reaches;
- ``flash_attn_with_kvcache`` (flash-attn's paged decode) when importable
  (its paged mode needs blocks of 256 tokens; it gets its own cache).

The correctness figure of each row is against SDPA in fp32 on the gathered K/V.
On CPU ``llm_engine`` is the engine's CPU path, ``ops.paged_attention``: in fp32
the C++ kernel ``_C.paged_decode_attention``, which reads the cache blocks in
place (fp32, SmolLM2-like 64-wide heads), also when ``TRITON_INTERPRET=1`` (the
Triton kernel's CPU runs in the interpreter are the tests' business: they are no
speed figure).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F

from llm_engine import ops
from llm_engine.bench.common import OURS, Ceilings, Row, rel_error, time_ms
from llm_engine.kernels.paged_attention import paged_attention

SUITE = "paged_attention"
HEADS, KV_HEADS, BLOCK_SIZE = 32, 8, 16
FLASH_BLOCK_SIZE = 256
KV_BYTES_CAP = 4 << 30


def _cases(device: str, quick: bool) -> list[tuple[int, int, int]]:
    """(batch, context, head_dim) triples."""
    if torch.device(device).type != "cuda":
        return [(1, 64, 16), (4, 32, 16)] if quick else [(1, 4096, 64), (32, 128, 64),
                                                          (32, 1024, 64)]
    if quick:
        return [(1, 8192, 128), (16, 2048, 128), (128, 512, 64)]
    return [(b, c, d) for d in (64, 128) for b in (1, 16, 128)
            for c in (512, 2048, 8192, 32768)]


def _make_case(batch: int, context: int, head_dim: int, block_size: int, dtype: torch.dtype,
               device: str) -> dict:
    blocks_per_seq = -(-context // block_size)
    num_blocks = batch * blocks_per_seq
    k_cache = torch.randn(num_blocks, block_size, KV_HEADS, head_dim, device=device, dtype=dtype)
    v_cache = torch.randn_like(k_cache)
    tables = torch.randperm(num_blocks, device=device).to(torch.int32).view(batch, blocks_per_seq)
    return {
        "q": torch.randn(batch, HEADS, head_dim, device=device, dtype=dtype),
        "k_cache": k_cache,
        "v_cache": v_cache,
        "block_tables": tables,
        "context_lens": torch.full((batch,), context, dtype=torch.int32, device=device),
    }


def _gather(cache: torch.Tensor, tables: torch.Tensor, context: int) -> torch.Tensor:
    """``(batch, kv_heads, context, head_dim)`` contiguous K or V of every sequence."""
    batch = tables.shape[0]
    g = cache[tables.long()].view(batch, -1, *cache.shape[2:])[:, :context]
    return g.transpose(1, 2)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q: (batch, heads, head_dim); k/v: (batch, kv_heads, context, head_dim)."""
    out = F.scaled_dot_product_attention(q.unsqueeze(2), k, v, enable_gqa=True)
    return out.squeeze(2)


def _flash_attn():
    try:
        from flash_attn import flash_attn_with_kvcache
    except ImportError as e:
        return None, f"flash-attn not installed ({e})"
    return flash_attn_with_kvcache, ""


def iter_rows(device: str, quick: bool, ceilings: Ceilings) -> Iterator[Row]:
    cuda = torch.device(device).type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    elem = torch.finfo(dtype).bits // 8
    flash, flash_note = _flash_attn() if cuda else (None, "flash-attn needs CUDA")
    for batch, context, head_dim in _cases(device, quick):
        case = f"b{batch} ctx{context} d{head_dim}"
        params = {"batch": batch, "context": context, "head_dim": head_dim}
        nbytes = 2 * batch * context * KV_HEADS * head_dim * elem
        if nbytes > KV_BYTES_CAP:
            yield Row(SUITE, case, OURS, "GB/s", None, params=params,
                      note=f"skipped: K/V of {nbytes / 2**30:.1f} GiB exceed the "
                           f"{KV_BYTES_CAP / 2**30:.0f} GiB cap of this benchmark")
            continue
        args = _make_case(batch, context, head_dim, BLOCK_SIZE, dtype, device)
        k = _gather(args["k_cache"], args["block_tables"], context)
        v = _gather(args["v_cache"], args["block_tables"], context)
        ref = _sdpa(args["q"].float(), k.float(), v.float())

        def gbps(ms: float, nbytes: int = nbytes) -> float:
            return nbytes / (ms * 1e-3) / 1e9

        if cuda:
            ours, note = (lambda a=args: paged_attention(**a)), ""
        else:
            ours = lambda a=args: ops.paged_attention(**a)
            note = "CPU: the C++ kernel _C.paged_decode_attention (fp32)"
        ms = time_ms(ours, device, quick=quick)
        yield Row(SUITE, case, OURS, "GB/s", gbps(ms), ms=ms, rel_err=rel_error(ours(), ref),
                  ceiling_frac=gbps(ms) / ceilings.bandwidth_gbps, params=params, note=note)

        def gather_sdpa(a=args, context=context):
            return _sdpa(a["q"], _gather(a["k_cache"], a["block_tables"], context),
                         _gather(a["v_cache"], a["block_tables"], context))

        ms = time_ms(gather_sdpa, device, quick=quick)
        yield Row(SUITE, case, "gather+sdpa", "GB/s", gbps(ms), ms=ms,
                  rel_err=rel_error(gather_sdpa(), ref), params=params,
                  ceiling_frac=gbps(ms) / ceilings.bandwidth_gbps,
                  note="gather through the block table, then scaled_dot_product_attention")
        ms = time_ms(lambda q=args["q"], k=k, v=v: _sdpa(q, k, v), device, quick=quick)
        yield Row(SUITE, case, "sdpa (pre-gathered)", "GB/s", gbps(ms), ms=ms,
                  rel_err=rel_error(_sdpa(args["q"], k, v), ref), params=params,
                  ceiling_frac=gbps(ms) / ceilings.bandwidth_gbps,
                  note="SDPA alone on contiguous K/V (gather not timed)")
        del k, v
        yield _flash_row(flash, flash_note, case, params, args, context, head_dim, device, ref,
                         gbps, ceilings, quick)


def _flash_row(flash, flash_note, case, params, args, context, head_dim, device, ref, gbps,
               ceilings, quick) -> Row:
    if flash is None:
        return Row(SUITE, case, "flash_attn_with_kvcache", "GB/s", None, params=params,
                   note=flash_note)
    batch = args["q"].shape[0]
    # Same tokens in flash-attn's paged layout (256-token blocks), same block order.
    fk = _gather(args["k_cache"], args["block_tables"], context).transpose(1, 2)
    fv = _gather(args["v_cache"], args["block_tables"], context).transpose(1, 2)
    blocks_per_seq = -(-context // FLASH_BLOCK_SIZE)
    pad = blocks_per_seq * FLASH_BLOCK_SIZE - context
    fk = F.pad(fk, (0, 0, 0, 0, 0, pad)).reshape(-1, FLASH_BLOCK_SIZE, KV_HEADS, head_dim)
    fv = F.pad(fv, (0, 0, 0, 0, 0, pad)).reshape(-1, FLASH_BLOCK_SIZE, KV_HEADS, head_dim)
    table = torch.arange(batch * blocks_per_seq, device=device, dtype=torch.int32)
    table = table.view(batch, blocks_per_seq)
    q = args["q"].unsqueeze(1)
    lens = args["context_lens"]

    def run():
        return flash(q, fk, fv, cache_seqlens=lens, block_table=table).squeeze(1)

    ms = time_ms(run, device, quick=quick)
    return Row(SUITE, case, "flash_attn_with_kvcache", "GB/s", gbps(ms), ms=ms,
               rel_err=rel_error(run(), ref), params=params,
               ceiling_frac=gbps(ms) / ceilings.bandwidth_gbps,
               note=f"flash-attn paged decode, {FLASH_BLOCK_SIZE}-token blocks")


def run(device: str, quick: bool, ceilings: Ceilings) -> list[Row]:
    """Rows for every case and implementation (see the module docstring)."""
    return list(iter_rows(device, quick, ceilings))
