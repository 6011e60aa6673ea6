"""Run one kernel in a loop for Nsight Compute: warm-up outside the profiled
range, the measured loop between ``cudaProfilerStart`` and ``cudaProfilerStop``,
so ``ncu --profile-from-start off`` sees only the steady-state launches.

Each kernel is an op of ``llm_engine.ops``; the loop runs the op's ``triton``
implementation unless another one is named (``--backend rms_norm=cpp``), taken from
the op registry after checking that it can take the inputs.
"""

from __future__ import annotations

import re
import shlex
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from llm_engine.bench.common import synchronize

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

Workload = Callable[[], object]


@dataclass(frozen=True)
class Kernel:
    """``shape``: what ``--shape`` lists, in order; ``op``: the op of ``llm_engine.ops``
    it implements; ``build(shape, dtype, device, backward, impl)`` makes the inputs once
    and returns the call to repeat."""

    shape: str
    dims: tuple[int, ...]
    op: str
    build: Callable[[tuple[int, ...], torch.dtype, torch.device, bool, str], Workload]


def _impl(op: str, impl: str, *args, **kwargs) -> Callable:
    """Implementation ``impl`` of ``op`` from the registry, checked against these inputs."""
    from llm_engine import ops

    why = ops.registry().eligible(op, *args, **kwargs).get(impl)
    fn = ops.registry().implementation(op, impl)  # ValueError for an unknown name
    if why is not None:
        raise ValueError(f"{op}={impl} cannot take these inputs: {why}")
    return fn


def _with_backward(forward: Callable[[], torch.Tensor], leaves: list[torch.Tensor],
                   backward: bool) -> Workload:
    if not backward:
        return lambda: forward()
    for t in leaves:
        t.requires_grad_(True)
    grad = torch.randn_like(forward())

    def step() -> None:
        forward().backward(grad)

    return step


def _norm(rms: bool) -> Callable[[tuple[int, ...], torch.dtype, torch.device, bool, str],
                                  Workload]:
    def build(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device,
              backward: bool, impl: str) -> Workload:
        rows, hidden = shape
        x = torch.randn(rows, hidden, device=device, dtype=dtype)
        w = torch.randn(hidden, device=device, dtype=dtype)
        leaves = [x, w] if rms else [x, w, torch.randn(hidden, device=device, dtype=dtype)]
        for t in leaves:
            t.requires_grad_(backward)
        args = (*leaves, 1e-5)
        fn = _impl("rms_norm" if rms else "layer_norm", impl, *args)
        return _with_backward(lambda: fn(*args), leaves, backward)

    return build


def _attention(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device,
               backward: bool, impl: str) -> Workload:
    batch, seqlen, heads, head_dim, *rest = shape
    kv_heads = rest[0] if rest else heads
    q = torch.randn(batch * seqlen, heads, head_dim, device=device, dtype=dtype)
    k = torch.randn(batch * seqlen, kv_heads, head_dim, device=device, dtype=dtype)
    v = torch.randn_like(k)
    cu = torch.arange(batch + 1, device=device, dtype=torch.int32) * seqlen
    for t in (q, k, v):
        t.requires_grad_(backward)
    args = (q, k, v, cu, cu, seqlen, seqlen)
    fn = _impl("attention_varlen", impl, *args)
    return _with_backward(lambda: fn(*args, causal=True), [q, k, v], backward)


def _sampling(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device,
              backward: bool, impl: str) -> Workload:
    if backward:
        raise ValueError("sampling has no backward")
    batch, vocab = shape
    logits = torch.randn(batch, vocab, device=device, dtype=dtype)
    fn = _impl("sample", impl, logits, 1.0)
    return lambda: fn(logits, 1.0, top_p=0.9, seed=0)


def _paged_attention(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device,
                     backward: bool, impl: str) -> Workload:
    if backward:
        raise ValueError("paged_attention has no backward")
    batch, context, heads, head_dim, *rest = shape
    kv_heads = rest[0] if rest else heads
    block_size = 16
    blocks_per_seq = -(-context // block_size)
    num_blocks = batch * blocks_per_seq
    k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, device=device, dtype=dtype)
    v_cache = torch.randn_like(k_cache)
    tables = torch.randperm(num_blocks, device=device).to(torch.int32).view(batch, blocks_per_seq)
    lens = torch.full((batch,), context, dtype=torch.int32, device=device)
    q = torch.randn(batch, heads, head_dim, device=device, dtype=dtype)
    fn = _impl("paged_attention", impl, q, k_cache, v_cache, tables, lens)
    return lambda: fn(q, k_cache, v_cache, tables, lens)


KERNELS: dict[str, Kernel] = {
    "layer_norm": Kernel("ROWS,HIDDEN", (2,), "layer_norm", _norm(rms=False)),
    "rms_norm": Kernel("ROWS,HIDDEN", (2,), "rms_norm", _norm(rms=True)),
    "attention": Kernel("BATCH,SEQLEN,HEADS,HEAD_DIM[,KV_HEADS] (causal, packed)", (4, 5),
                        "attention_varlen", _attention),
    "sampling": Kernel("BATCH,VOCAB (temperature 1, top-p 0.9)", (2,), "sample", _sampling),
    "paged_attention": Kernel("BATCH,CONTEXT,HEADS,HEAD_DIM[,KV_HEADS] (16-token blocks)", (4, 5),
                              "paged_attention", _paged_attention),
}


def parse_shape(text: str) -> tuple[int, ...]:
    """``"4096,1024"`` or ``"4096x1024"`` → ``(4096, 1024)``."""
    parts = [p for p in re.split(r"[,x×\s]+", text.strip()) if p]
    if not parts or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise ValueError(f"shape must be positive integers separated by commas, got {text!r}")
    return tuple(int(p) for p in parts)


def build_workload(name: str, shape: tuple[int, ...], dtype: torch.dtype,
                   device: str | torch.device, backward: bool = False,
                   impl: str = "triton") -> Workload:
    """The call that ``profile_kernel`` repeats, with its inputs already made; ``impl``:
    the implementation of the kernel's op to run."""
    if name not in KERNELS:
        raise ValueError(f"unknown kernel {name!r}; choose from {', '.join(KERNELS)}")
    kernel = KERNELS[name]
    if len(shape) not in kernel.dims:
        raise ValueError(f"{name} takes --shape {kernel.shape}, got {shape}")
    return kernel.build(shape, dtype, torch.device(device), backward, impl)


def profile_kernel(workload: Workload, device: str | torch.device, iters: int,
                   warmup: int) -> float:
    """Run ``warmup`` calls, then ``iters`` calls inside the CUDA profiler range
    (on CUDA); return the mean milliseconds per call of the measured loop."""
    for _ in range(warmup):
        workload()
    synchronize(device)
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.cudart().cudaProfilerStart()
    start = time.perf_counter()
    try:
        for _ in range(iters):
            workload()
        synchronize(device)
    finally:
        if cuda:
            torch.cuda.cudart().cudaProfilerStop()
    return (time.perf_counter() - start) * 1e3 / iters


def ncu_command(name: str, shape: tuple[int, ...], dtype: str, iters: int, warmup: int,
                backward: bool, backends: list[str] | tuple[str, ...] = ()) -> str:
    """The Nsight Compute command line that profiles exactly this loop."""
    launcher = ["llm-engine"] if shutil.which("llm-engine") else [sys.executable, "-m",
                                                                   "llm_engine.bench.cli"]
    shape_text = ",".join(map(str, shape))
    args = ["ncu", "--profile-from-start", "off", "--set", "full", "-f", "-o",
            f"{name}_{shape_text.replace(',', 'x')}_{dtype}", *launcher, "profile-kernel", name,
            "--shape", shape_text, "--dtype", dtype, "--iters", str(iters),
            "--warmup", str(warmup), "--device", "cuda"]
    if backward:
        args.append("--backward")
    for item in backends:
        args += ["--backend", item]
    return shlex.join(args)
