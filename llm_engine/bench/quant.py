"""Quantized linear layers: GB/s of weight bytes read, against their references.

Shapes: SmolLM2-135M's fused up projection (3072 x 576), its down projection
(576 x 1536) and its tied LM head (49152 x 576), at 1, 32 and 256 rows.

- CPU: ``llm_engine`` is ``ops.linear`` on a ``QuantizedWeight`` (Q4_1 body, Q8_0 head,
  as in the SmolLM2 GGUF) in the ``rows8`` layout the engine holds it in: the C++ kernel
  below ``ops.QUANT_GEMM_MIN_ROWS`` rows, tiles dequantized into oneDNN's GEMM from
  there; ``int8`` is ``quantized_linear=int8`` on it (forced, every row count: x rounded
  to int8 per 32-block as llama.cpp does, then integer dot products, what decode steps
  run; its ``rel_err`` includes that rounding); ``rows`` and ``int8-rows`` are the same
  on the GGUF layout; ``fp32-packed`` is the same product on the dequantized fp32
  weight through oneDNN with a packed weight (what the fp32 engine runs); ``torch``
  dequantizes then matmuls (the reference).
- CUDA: ``llm_engine`` is the Triton weight-only GEMM (``kernels/quant_matmul.py``,
  int4 body / int8 head, groups of 32, fp16 activations); ``torch`` dequantizes then
  runs cuBLAS.

``GB/s``: bytes of the quantized weight per call over the time (the fp32 rows: their
fp32 weight's bytes); ``rel_err`` against the fp64 product with the dequantized weight.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from llm_engine.bench.common import OURS, Ceilings, Row, rel_error, time_ms

SUITE = "quant"
SHAPES = (("up_proj", 3072, 576, "q4_1"), ("down_proj", 576, 1536, "q4_1"),
          ("lm_head", 49152, 576, "q8_0"))


def _rows(quick: bool) -> list[int]:
    return [1, 32] if quick else [1, 32, 256]


def _cpu_rows(quick: bool, ceilings: Ceilings) -> Iterator[Row]:
    from llm_engine import ops
    from llm_engine.quant import quantize

    int8 = ops.registry().implementation("quantized_linear", "int8")
    gen = torch.Generator().manual_seed(0)
    for name, n, k, qtype in SHAPES:
        rows_w = quantize(torch.randn(n, k, generator=gen) * 0.05, qtype)
        qw = rows_w.to_layout("rows8")
        w = qw.dequantize()
        packed = ops.PackedWeight()
        for rows in _rows(quick):
            x = torch.randn(rows, k, generator=gen)
            exact = x.double() @ w.double().T
            params = {"rows": rows, "n": n, "k": k}
            impls = ((OURS, lambda x=x, qw=qw: ops.linear(x, qw), qw.blocks.numel(),
                      f"{qtype} blocks, rows8 layout"),
                     ("int8", lambda x=x, qw=qw: int8(x, qw), qw.blocks.numel(),
                      f"{qtype} blocks, x rounded to int8 per 32"),
                     ("rows", lambda x=x, qw=rows_w: ops.linear(x, qw), qw.blocks.numel(),
                      f"{qtype} blocks in GGUF's layout"),
                     ("int8-rows", lambda x=x, qw=rows_w: int8(x, qw), qw.blocks.numel(),
                      f"{qtype} blocks in GGUF's layout, x rounded to int8 per 32"),
                     ("fp32-packed", lambda x=x, w=w, p=packed: ops.linear(x, w, packed=p),
                      w.numel() * 4, "oneDNN on the packed dequantized weight"),
                     ("torch", lambda x=x, qw=qw: ops.quantized_linear_reference(x, qw),
                      qw.blocks.numel(), "dequantize, then F.linear"))
            with torch.inference_mode():
                for impl, fn, nbytes, note in impls:
                    ms = time_ms(fn, "cpu", quick=quick)
                    gbps = nbytes / (ms * 1e-3) / 1e9
                    yield Row(SUITE, f"{name} rows{rows}", impl, "GB/s", gbps, ms=ms,
                              ceiling_frac=gbps / ceilings.bandwidth_gbps,
                              rel_err=rel_error(fn(), exact), note=note, params=params)


def _cuda_rows(device: str, quick: bool, ceilings: Ceilings) -> Iterator[Row]:
    from llm_engine.kernels.quant_matmul import dequantize_reference, pack_int4, quant_matmul

    for name, n, k, qtype in SHAPES:
        bits = 8 if qtype == "q8_0" else 4
        if bits == 8:
            q = torch.randint(-127, 128, (n, k), dtype=torch.int8, device=device)
        else:
            q = pack_int4(torch.randint(0, 16, (n, k), dtype=torch.uint8, device=device))
        scales = torch.rand(n, k // 32, device=device, dtype=torch.float16) * 0.01
        offsets = torch.randn(n, k // 32, device=device, dtype=torch.float16) * 0.01
        nbytes = q.numel() + 4 * scales.numel()
        for rows in _rows(quick):
            x = torch.randn(rows, k, device=device, dtype=torch.float16)
            w32 = dequantize_reference(q, scales, offsets, bits)
            exact = x.double() @ w32.double().T
            params = {"rows": rows, "n": n, "k": k}

            def ref(x=x, q=q, s=scales, o=offsets, bits=bits):
                return x @ dequantize_reference(q, s, o, bits).half().T

            for impl, fn, note in (
                    (OURS, lambda x=x, q=q, s=scales, o=offsets, bits=bits:
                     quant_matmul(x, q, s, o, bits), "Triton weight-only GEMM"),
                    ("torch", ref, "dequantize, then cuBLAS")):
                ms = time_ms(fn, device, quick=quick)
                gbps = nbytes / (ms * 1e-3) / 1e9
                yield Row(SUITE, f"{name} rows{rows}", impl, "GB/s", gbps, ms=ms,
                          ceiling_frac=gbps / ceilings.bandwidth_gbps,
                          rel_err=rel_error(fn(), exact), note=note, params=params)


def iter_rows(device: str, quick: bool, ceilings: Ceilings) -> Iterator[Row]:
    if torch.device(device).type == "cuda":
        yield from _cuda_rows(device, quick, ceilings)
    else:
        yield from _cpu_rows(quick, ceilings)


def run(device: str, quick: bool, ceilings: Ceilings) -> list[Row]:
    """Rows for every shape, row count and implementation (see the module docstring)."""
    return list(iter_rows(device, quick, ceilings))
