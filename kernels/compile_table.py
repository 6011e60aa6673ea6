"""Compile table: every configuration the kernel launchers use, compiled ahead of time.

``compile_table()`` lists, for representative shapes (SmolLM2-135M, GPT-2 124M and
a Llama-3-8B-sized layer) and dtypes (bf16, fp16, fp32), each kernel launch the
wrappers in this package make, autotuning configurations included: the kernel,
its arguments (mock tensors of the right dtype, integers of the right size) and
its launch options. ``compile_entry`` compiles one entry for a GPU architecture
(``sm_90``, ``sm_80``) with the installed Triton and its own ``ptxas``; no GPU is
needed. The result gives registers per thread, spill bytes, stack frame, shared
memory per block and whether the PTX uses Hopper's ``wgmma`` tensor-core
instructions, the figures ``tests/test_compile.py`` checks and ``make gpu-compile``
prints (``python -m llm_engine.kernels.compile_table``).

Arguments go through Triton's own launch binder, so each entry is specialised
(16-byte divisibility, integers equal to 1) exactly as the launch would be.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import io
import json
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field

import torch
import triton

from ._utils import AUTOTUNE_ENV

# The modules (the package re-exports functions named like two of them).
attention, cross_entropy, layer_norm, paged_attention, quant_matmul, sampling = (
    importlib.import_module(f"{__package__}.{name}")
    for name in ("attention", "cross_entropy", "layer_norm", "paged_attention", "quant_matmul",
                 "sampling"))

SMEM_LIMIT = {75: 64 * 1024, 80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024,
              100: 227 * 1024, 120: 99 * 1024}
"""Shared memory a block may use (opt-in maximum), per architecture (bytes)."""

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class Shape:
    """A model's sizes that the kernels see."""

    name: str
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    rms: bool  # RMSNorm without bias (Llama family) or LayerNorm with bias (GPT-2)


SHAPES = (
    Shape("smollm2-135m", 576, 9, 3, 64, 49152, True),
    Shape("gpt2-124m", 768, 12, 12, 64, 50257, False),
    Shape("llama3-8b", 4096, 32, 8, 128, 128256, True),
)
TOKENS = 4096  # packed tokens of a prefill or training batch
DECODE_SEQS = 64  # sequences in a decode batch
CONTEXT = 4096  # tokens of context per decoding sequence
BLOCK_SIZE = 16  # paged KV cache block size


@dataclass(frozen=True)
class Entry:
    """One kernel launch: ``fn[grid](*args, **kwargs)`` (kwargs hold constexprs and options)."""

    kernel: str
    shape: str
    dtype: str
    config: str
    quick: bool  # launched under LLM_ENGINE_AUTOTUNE=quick
    fn: object = field(repr=False, compare=False)
    args: tuple = field(repr=False, compare=False)
    kwargs: dict = field(repr=False, compare=False)

    @property
    def sixteen_bit(self) -> bool:
        return self.dtype in ("bf16", "fp16")


@dataclass(frozen=True)
class Compiled:
    """What ``ptxas`` and Triton report for one entry compiled for ``sm_<arch>``."""

    kernel: str
    shape: str
    dtype: str
    config: str
    quick: bool
    arch: int
    registers: int
    spill_bytes: int  # spill stores, bytes per thread
    stack_bytes: int  # stack frame, bytes per thread (spills and local arrays)
    shared_bytes: int
    wgmma: bool
    seconds: float
    triton: str

    @property
    def fits(self) -> bool:
        return self.shared_bytes <= SMEM_LIMIT[self.arch]


def _t(dtype: torch.dtype) -> object:
    from triton.runtime.jit import MockTensor  # a dtype and a 16-byte aligned address

    return MockTensor(dtype)


def _describe(kwargs: dict, names: Sequence[str]) -> str:
    parts = [f"{n}={kwargs[n]}" for n in names if n in kwargs]
    parts += [f"{k}={kwargs[k]}" for k in ("num_warps", "num_stages", "maxnreg") if k in kwargs]
    return " ".join(parts)


def _config_kwargs(config: triton.Config) -> dict:
    out = dict(config.kwargs)
    out["num_warps"] = config.num_warps
    out["num_stages"] = config.num_stages
    if getattr(config, "maxnreg", None):
        out["maxnreg"] = config.maxnreg
    return out


def _autotuned(autotuner, kwargs: dict) -> list[tuple[triton.Config, bool]]:
    """The configs an autotuned kernel tries for ``kwargs``, each with whether quick mode keeps it."""
    full = autotuner.early_config_prune(autotuner.configs, {}, **kwargs) \
        if autotuner.early_config_prune else autotuner.configs
    with _quick_mode():
        quick = autotuner.early_config_prune(autotuner.configs, {}, **kwargs) \
            if autotuner.early_config_prune else autotuner.configs
    return [(c, c in quick) for c in full]


@contextlib.contextmanager
def _quick_mode() -> Iterator[None]:
    old = os.environ.get(AUTOTUNE_ENV)
    os.environ[AUTOTUNE_ENV] = "quick"
    try:
        yield
    finally:
        if old is None:
            del os.environ[AUTOTUNE_ENV]
        else:
            os.environ[AUTOTUNE_ENV] = old


# --------------------------------------------------------------------------- entries per family


def _attention(s: Shape, dt: str) -> Iterator[Entry]:
    dtype = DTYPES[dt]
    block_d = triton.next_power_of_2(s.head_dim)
    q, kv, f32, i32 = _t(dtype), _t(dtype), _t(torch.float32), _t(torch.int32)
    sq, sk = (s.heads * s.head_dim, s.head_dim), (s.kv_heads * s.head_dim, s.head_dim)
    common = dict(GROUP=s.heads // s.kv_heads, HEAD_DIM=s.head_dim, BLOCK_D=block_d, CAUSAL=True,
                  DOT_PRECISION=attention._dot_precision(dtype))
    scale, key = 1.0 / s.head_dim ** 0.5, TOKENS
    args = {
        "fwd": (q, kv, kv, q, f32, i32, i32, *sq, *sk, *sk, *sq, TOKENS, scale, key),
        "dkdv": (q, kv, kv, q, f32, f32, kv, kv, i32, i32, *sq, *sk, *sk, *sq, *sk, *sk,
                 TOKENS, scale, scale, key),
        "dq": (q, kv, kv, q, f32, f32, q, i32, i32, *sq, *sk, *sk, *sq, *sq, TOKENS,
               scale, scale, key),
    }
    tuners = {"fwd": attention._fwd, "dkdv": attention._bwd_dkdv, "dq": attention._bwd_dq}
    for name, tuner in tuners.items():
        for config, quick in _autotuned(tuner, {"Q": q, **common}):
            kw = {**common, **_config_kwargs(config)}
            yield Entry(f"attention.{name}", s.name, dt,
                        _describe(kw, ("BLOCK_M", "BLOCK_N")), quick, tuner.fn, args[name], kw)
    kw = dict(HEAD_DIM=s.head_dim, BLOCK_D=block_d, BLOCK_T=attention._delta_block_t())
    yield Entry("attention.delta", s.name, dt, _describe(kw, ("BLOCK_T",)), True,
                attention._attn_bwd_delta_kernel, (q, q, f32, TOKENS, *sq, *sq, TOKENS), kw)


def _paged(s: Shape, dt: str) -> Iterator[Entry]:
    pa = paged_attention
    dtype = DTYPES[dt]
    q, c, f32, i32 = _t(dtype), _t(dtype), _t(torch.float32), _t(torch.int32)
    kvd = s.kv_heads * s.head_dim
    cache_strides = (BLOCK_SIZE * kvd, kvd, s.head_dim)
    sq = (s.heads * s.head_dim, s.head_dim)
    scale, group = 1.0 / s.head_dim ** 0.5, s.heads // s.kv_heads
    block_d = pa._block_d(s.head_dim)
    max_blocks = CONTEXT // BLOCK_SIZE

    kw = dict(BLOCK_SIZE=BLOCK_SIZE, BLOCK_H=triton.next_power_of_2(s.kv_heads),
              BLOCK_D=triton.next_power_of_2(s.head_dim))
    yield Entry("paged.store_kv", s.name, dt, _describe(kw, ("BLOCK_H", "BLOCK_D")), True,
                pa._store_kv_kernel, (q, q, c, c, _t(torch.int64), kvd, s.head_dim, kvd,
                                      s.head_dim, *cache_strides, *cache_strides,
                                      s.kv_heads, s.head_dim), kw)

    for split in (False, True):
        block_n = pa._decode_block_n(s.head_dim)
        partition = pa._MIN_PARTITION if split else CONTEXT
        while partition % block_n:
            block_n //= 2
        parts = triton.cdiv(CONTEXT, partition)
        kw = dict(BLOCK_SIZE=BLOCK_SIZE, GROUP_PAD=max(16, triton.next_power_of_2(group)),
                  BLOCK_N=block_n, BLOCK_D=block_d, SPLIT=split, IN_PREC=pa._in_prec(dtype),
                  **pa._decode_options(block_n, block_d, dtype))
        part = f32 if split else q  # unsplit launches pass the output for the partials
        args = (q, c, c, i32, i32, q, part, part, part, *sq, *cache_strides, *cache_strides,
                max_blocks, *sq, scale, group, s.head_dim, partition, parts)
        yield Entry("paged.decode_split" if split else "paged.decode", s.name, dt,
                    _describe(kw, ("BLOCK_N", "GROUP_PAD")), True, pa._paged_decode_kernel,
                    args, kw)
    kw = dict(CHUNK=pa._REDUCE_CHUNK, BLOCK_D=block_d)
    yield Entry("paged.decode_reduce", s.name, dt, _describe(kw, ("CHUNK",)), True,
                pa._paged_decode_reduce_kernel,
                (f32, f32, f32, i32, q, *sq, s.head_dim, pa._MIN_PARTITION,
                 CONTEXT // pa._MIN_PARTITION), kw)

    block_m, block_n, options = pa._prefill_config(s.head_dim, dtype)
    kw = dict(BLOCK_SIZE=BLOCK_SIZE, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
              IN_PREC=pa._in_prec(dtype), **options)
    yield Entry("paged.prefill", s.name, dt, _describe(kw, ("BLOCK_M", "BLOCK_N")), True,
                pa._paged_prefill_kernel,
                (q, c, c, i32, i32, i32, q, *sq, *cache_strides, *cache_strides, max_blocks,
                 *sq, scale, group, s.head_dim), kw)


def _norm(s: Shape, dt: str) -> Iterator[Entry]:
    ln = layer_norm
    dtype = DTYPES[dt]
    x, w, f32 = _t(dtype), _t(dtype), _t(torch.float32)
    bias = None if s.rms else w
    mean = None if s.rms else f32
    n = s.hidden
    block_n = ln._block_n(n, ln._MAX_FWD_BLOCK_N)
    for residual in (False, True):
        rows = ln._rows_per_tile(block_n)
        common = dict(IS_RMS=s.rms, HAS_BIAS=not s.rms, HAS_RESIDUAL=residual,
                      ONE_PASS=n <= block_n, ROWS=rows, BLOCK_N=block_n)
        args = (x, x if residual else None, w, bias, x, x if residual else None, mean, f32,
                n, n if residual else 0, TOKENS, n, 1e-5)
        for config, quick in _autotuned(ln._norm_fwd_kernel, common):
            kw = {**common, **_config_kwargs(config)}
            yield Entry("layer_norm.fwd" + ("_residual" if residual else ""), s.name, dt,
                        _describe(kw, ("ROWS", "BLOCK_N")), quick, ln._norm_fwd_kernel.fn, args, kw)
    block_n = ln._block_n(n, ln._MAX_BWD_BLOCK_N)
    common = dict(IS_RMS=s.rms, HAS_BIAS=not s.rms, HAS_DH=True, ONE_PASS=n <= block_n,
                  ROWS=ln._rows_per_tile(block_n), BLOCK_N=block_n)
    args = (x, x, x, w, mean, f32, x, f32, None if s.rms else f32, n, TOKENS, n, 8)
    for config, quick in _autotuned(ln._norm_bwd_kernel, common):
        kw = {**common, **_config_kwargs(config)}
        yield Entry("layer_norm.bwd", s.name, dt, _describe(kw, ("ROWS", "BLOCK_N")), quick,
                    ln._norm_bwd_kernel.fn, args, kw)
    common = dict(HAS_BIAS=not s.rms)
    args = (f32, None if s.rms else f32, w, bias, 528, n)
    for config, quick in _autotuned(ln._sum_partials_kernel, common):
        kw = {**common, **_config_kwargs(config)}
        yield Entry("layer_norm.sum_partials", s.name, dt,
                    _describe(kw, ("BLOCK_G", "BLOCK_COLS")), quick, ln._sum_partials_kernel.fn,
                    args, kw)


def _cross_entropy(s: Shape, dt: str) -> Iterator[Entry]:
    ce = cross_entropy
    logits = _t(DTYPES[dt])
    args = (logits, s.vocab, _t(torch.int64), _t(torch.float32), _t(torch.float32), s.vocab,
            -100)
    for config, quick in _autotuned(ce._ce_rows_kernel, {}):
        kw = {"COMPUTE_GRAD": True, **_config_kwargs(config)}
        yield Entry("cross_entropy.rows", s.name, dt, _describe(kw, ("BLOCK_V",)), quick,
                    ce._ce_rows_kernel.fn, args, kw)


# Filter combinations a sampling launch specialises on: plain temperature sampling, the
# usual top-k + top-p, and every filter with log-probabilities.
_SAMPLING_VARIANTS = {
    "temperature": dict(HAS_TOP_K=False, HAS_TOP_P=False, HAS_MIN_P=False, WANT_LOGPROBS=False),
    "top_k+top_p": dict(HAS_TOP_K=True, HAS_TOP_P=True, HAS_MIN_P=False, WANT_LOGPROBS=False),
    "all+logprobs": dict(HAS_TOP_K=True, HAS_TOP_P=True, HAS_MIN_P=True, WANT_LOGPROBS=True),
}


def _sampling(s: Shape, dt: str) -> Iterator[Entry]:
    f32, i32, i64 = _t(torch.float32), _t(torch.int32), _t(torch.int64)
    for variant, flags in _SAMPLING_VARIANTS.items():
        rows, block, cap, pivots, options = sampling._launch_config(
            DECODE_SEQS, s.vocab, torch.device("cuda"), flags["HAS_TOP_K"] or flags["HAS_TOP_P"])
        args = (_t(DTYPES[dt]), s.vocab, DECODE_SEQS, s.vocab, f32, i32, f32, f32, i64, i64,
                i64, f32, i32, f32, triton.cdiv(s.vocab, block), i32, i32)
        kw = dict(**flags, SEED_PER_ROW=True, ROWS=rows, BLOCK=block, PIVOTS=pivots, CAP=cap,
                  MAX_PASSES=sampling._MAX_PASSES, **options)
        yield Entry(f"sampling.{variant}", s.name, dt, _describe(kw, ("BLOCK", "CAP")), True,
                    sampling._sampling_kernel, args, kw)


def _quant_matmul(s: Shape, dt: str) -> Iterator[Entry]:
    """The weight-only GEMM on a (hidden, hidden) projection: int8 and int4 levels with
    fp16 group scales (GGUF's), for one decode row and a prefill's rows."""
    x, f32, scales = _t(DTYPES[dt]), _t(torch.float32), _t(torch.float16)
    for bits in (8, 4):
        levels = _t(torch.int8 if bits == 8 else torch.uint8)
        k_q = s.hidden * bits // 8
        for rows in (1, TOKENS):  # a batch-1 decode step, a prefill
            block_m, block_n, block_k = quant_matmul.launch_blocks(rows)
            kw = dict(BITS=bits, HALVES=8 // bits, GROUP=32, BLOCK_M=block_m, BLOCK_N=block_n,
                      BLOCK_K=block_k)
            args = (x, levels, scales, scales, f32, rows, s.hidden, s.hidden, k_q,
                    s.hidden // 32, k_q, s.hidden, k_q, s.hidden // 32, rows * s.hidden,
                    s.hidden)
            yield Entry(f"quant_matmul.int{bits}", s.name, dt,
                        _describe(kw, ("BLOCK_M", "BLOCK_N", "BLOCK_K")), True,
                        quant_matmul._quant_matmul_kernel, args, kw)


FAMILIES: dict[str, Callable[[Shape, str], Iterator[Entry]]] = {
    "attention": _attention,
    "paged": _paged,
    "layer_norm": _norm,
    "cross_entropy": _cross_entropy,
    "sampling": _sampling,
    "quant_matmul": _quant_matmul,
}


@functools.cache
def compile_table() -> tuple[Entry, ...]:
    """Every launch configuration, per shape and dtype (the same order on every call)."""
    return tuple(e for s in SHAPES for dt in DTYPES for family in FAMILIES.values()
                 for e in family(s, dt))


# --------------------------------------------------------------------------- compiling

_REGS = re.compile(r"Used (\d+) registers")
_SPILLS = re.compile(r"(\d+) bytes spill stores")
_STACK = re.compile(r"(\d+) bytes stack frame")


def _bind(entry: Entry, arch: int):
    """Triton's launch binder applied to the entry for ``sm_<arch>``: the source to compile,
    its options, and the key a launch computes (kernel, specialisation, options)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    fn = entry.fn
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kwargs = {"debug": False, **entry.kwargs}
    bound, specialization, options = binder(*entry.args, **kwargs)
    key = (fn.cache_key, str(specialization), str(options), arch)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound,
                                                         specialization, options)
    return ASTSource(fn, signature, constexprs, attrs), target, options, key


def compile_key(entry: Entry, arch: int) -> tuple:
    """Entries with equal keys compile to the same binary."""
    return _bind(entry, arch)[3]


def compile_entry(entry: Entry, arch: int = 90) -> Compiled:
    """Compile ``entry`` for ``sm_<arch>`` with the installed Triton and its ``ptxas`` (no GPU).

    Compiles into a fresh cache directory so that ``ptxas`` always runs and its
    report (registers, spill stores, stack frame) can be read.
    """
    from triton import knobs

    src, target, options, _ = _bind(entry, arch)
    start = time.perf_counter()
    log = io.StringIO()
    old_cache, old_dump = os.environ.get("TRITON_CACHE_DIR"), knobs.nvidia.dump_ptxas_log
    with tempfile.TemporaryDirectory(prefix="llm-engine-compile-") as cache_dir:
        os.environ["TRITON_CACHE_DIR"] = cache_dir
        knobs.nvidia.dump_ptxas_log = True
        try:
            with contextlib.redirect_stdout(log):
                kernel = triton.compile(src, target=target, options=options.__dict__)
        finally:
            knobs.nvidia.dump_ptxas_log = old_dump
            if old_cache is None:
                del os.environ["TRITON_CACHE_DIR"]
            else:
                os.environ["TRITON_CACHE_DIR"] = old_cache
    report = log.getvalue()
    regs = _REGS.search(report)
    if regs is None:
        raise RuntimeError(f"no ptxas report for {entry.kernel} ({entry.config}):\n{report}")
    return Compiled(
        kernel=entry.kernel, shape=entry.shape, dtype=entry.dtype, config=entry.config,
        quick=entry.quick, arch=arch, registers=int(regs.group(1)),
        spill_bytes=sum(int(x) for x in _SPILLS.findall(report)),
        stack_bytes=max((int(x) for x in _STACK.findall(report)), default=0),
        shared_bytes=int(kernel.metadata.shared), wgmma="wgmma" in kernel.asm["ptx"],
        seconds=time.perf_counter() - start, triton=triton.__version__,
    )


def _compile_index(job: tuple[int, int]) -> Compiled:
    index, arch = job
    return compile_entry(compile_table()[index], arch)


def _worker_init() -> None:
    torch.set_num_threads(1)


# What ``make test`` compiles (tests/test_compile.py): the quick configs of the 16-bit paths
# that must use wgmma or were seen to spill, sampling in both dtypes, one each of the other
# families, and the largest shared-memory users for sm_80.
SAMPLE: tuple[tuple[str, str, str, int], ...] = (
    *((f"attention.{k}", s, "bf16", 90) for k in ("fwd", "dkdv", "dq")
      for s in ("smollm2-135m", "llama3-8b")),
    ("paged.prefill", "smollm2-135m", "bf16", 90),
    ("paged.prefill", "llama3-8b", "fp16", 90),
    ("paged.decode_split", "llama3-8b", "bf16", 90),
    ("sampling.top_k+top_p", "smollm2-135m", "bf16", 90),
    ("sampling.top_k+top_p", "smollm2-135m", "fp32", 90),
    ("sampling.temperature", "gpt2-124m", "bf16", 90),
    ("sampling.all+logprobs", "llama3-8b", "bf16", 90),
    ("layer_norm.fwd_residual", "smollm2-135m", "bf16", 90),
    ("layer_norm.bwd", "gpt2-124m", "bf16", 90),
    ("cross_entropy.rows", "gpt2-124m", "bf16", 90),
    ("attention.fwd", "llama3-8b", "bf16", 80),
    ("attention.dkdv", "llama3-8b", "bf16", 80),
    ("paged.prefill", "llama3-8b", "bf16", 80),
)


def sample() -> list[tuple[Entry, int]]:
    """``SAMPLE`` as (entry, architecture) pairs: the first quick config of each."""
    table = compile_table()
    return [(next(e for e in table if e.quick and (e.kernel, e.shape, e.dtype) == key[:3]),
             key[3]) for key in SAMPLE]


def compile_many(wanted: Sequence[tuple[Entry, int]], jobs: int = 1,
                 progress: bool = False) -> list[Compiled]:
    """Compile each (entry of ``compile_table()``, architecture) pair, every distinct binary
    once, ``jobs`` at a time (worker processes); results follow ``wanted``'s order."""
    index = {id(e): i for i, e in enumerate(compile_table())}
    keys = [compile_key(e, arch) for e, arch in wanted]
    unique: dict[tuple, tuple[int, int]] = {}
    for key, (e, arch) in zip(keys, wanted, strict=True):
        unique.setdefault(key, (index[id(e)], arch))
    jobs_list = list(unique.values())
    if jobs > 1:
        with ProcessPoolExecutor(jobs, initializer=_worker_init) as pool:
            results = pool.map(_compile_index, jobs_list)
            done = dict(zip(unique, _progress(results, len(jobs_list), progress), strict=True))
    else:
        done = dict(zip(unique, _progress(map(_compile_index, jobs_list), len(jobs_list),
                                          progress), strict=True))
    out = []
    for key, (e, _) in zip(keys, wanted, strict=True):
        c = done[key]
        out.append(Compiled(**{**asdict(c), "kernel": e.kernel, "shape": e.shape,
                               "dtype": e.dtype, "config": e.config, "quick": e.quick}))
    return out


def _progress(results, total: int, show: bool):
    if not show:
        return results
    from tqdm import tqdm

    return tqdm(results, total=total, desc="compiling", unit="kernel", file=sys.stderr)


COLUMNS = ("kernel", "shape", "dtype", "config", "quick", "sm", "regs", "spills (B)", "stack (B)",
           "smem (KB)", "wgmma")


def row(c: Compiled) -> list[str]:
    """One result as the table's cells (``COLUMNS``)."""
    return [c.kernel, c.shape, c.dtype, c.config, "yes" if c.quick else "", f"sm_{c.arch}",
            str(c.registers), str(c.spill_bytes), str(c.stack_bytes),
            f"{c.shared_bytes / 1024:.1f}" + ("" if c.fits else " (over)"),
            "yes" if c.wgmma else ""]


def format_table(results: Sequence[Compiled]) -> str:
    """A fixed-width text table of ``results``."""
    cells = [list(COLUMNS)] + [row(c) for c in results]
    widths = [max(len(r[i]) for r in cells) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip()
                     for r in cells)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m llm_engine.kernels.compile_table",
        description="Compile every kernel configuration ahead of time (no GPU needed) and "
                    "print registers, spills, shared memory and wgmma use per entry.")
    parser.add_argument("--arch", type=int, action="append", choices=sorted(SMEM_LIMIT),
                        help="target architecture(s) (default: 90)")
    parser.add_argument("--kernel", action="append", default=[],
                        help="only kernels whose name starts with this (repeatable)")
    parser.add_argument("--dtype", action="append", choices=list(DTYPES), default=[])
    parser.add_argument("--shape", action="append", choices=[s.name for s in SHAPES], default=[])
    parser.add_argument("--quick", action="store_true",
                        help="only the configs LLM_ENGINE_AUTOTUNE=quick launches")
    parser.add_argument("--sample", action="store_true",
                        help="only the sample tests/test_compile.py checks")
    parser.add_argument("--list", action="store_true",
                        help="list the entries (with --json: write them) without compiling")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    if attention.interpreting():
        parser.error("TRITON_INTERPRET is set: the kernels were built for the interpreter")
    if args.sample:
        wanted = sample()
    else:
        wanted = [(e, arch) for e in compile_table()
                  if (not args.kernel or any(e.kernel.startswith(k) for k in args.kernel))
                  and (not args.dtype or e.dtype in args.dtype)
                  and (not args.shape or e.shape in args.shape)
                  and (e.quick or not args.quick) for arch in args.arch or [90]]
    if args.list:
        records = [{"kernel": e.kernel, "shape": e.shape, "dtype": e.dtype, "config": e.config,
                    "quick": e.quick, "arch": arch} for e, arch in wanted]
        print("\n".join(f"{r['kernel']}  {r['shape']}  {r['dtype']}  {r['config']}"
                        f"{'  (quick)' if r['quick'] else ''}" for r in records))
    else:
        results = compile_many(wanted, jobs=max(1, args.jobs), progress=True)
        records = [asdict(c) for c in results]
        print(f"Triton {triton.__version__}, {len(results)} entries")
        print(format_table(results))
        over = [c for c in results if not c.fits]
        if over:
            print(f"{len(over)} entries need more shared memory than their architecture has")
    if args.json:
        tmp = f"{args.json}.tmp"
        with open(tmp, "w") as f:
            json.dump(records, f, indent=1)
        os.replace(tmp, args.json)
    return 1 if not args.list and over else 0


if __name__ == "__main__":
    sys.exit(main())
