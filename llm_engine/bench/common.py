"""What every benchmark shares: a result row, timing, and correctness figures.

A suite module (``llm_engine.bench.layer_norm`` and friends) exposes
``run(device: str, quick: bool, ceilings: Ceilings) -> list[Row]``. The
runner collects rows from all suites into one report.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

OURS = "llm_engine"
INTERPRETER_NOTE = "Triton interpreter on CPU: not a speed figure"
"""The note of a row timed in the Triton interpreter: kept for its correctness figure,
left out of every speed comparison."""
"""``Row.impl`` of this engine's own implementation; every other impl is a reference."""


@dataclass
class Ceilings:
    """Hardware limits measured on the device at the start of a run."""

    device_name: str
    bandwidth_gbps: float  # device-to-device copy, bytes read + written
    matmul_tflops: float  # large matmul through ops.linear (bf16 cuBLAS on CUDA, fp32 oneDNN on CPU)


@dataclass
class Row:
    """One measured (case, implementation) pair.

    ``metric`` is the unit of ``value`` (``"GB/s"``, ``"TFLOP/s"``, ``"rows/s"``,
    ``"tok/s"``, ``"ops/s"``); ``ceiling_frac`` is ``value`` over the matching
    ceiling when one applies. ``rel_err`` is ``‖out−ref‖/‖ref‖`` of this
    implementation's output on the benchmarked inputs (``None`` only when the
    implementation produced no output, e.g. it is not installed: then ``note``
    says why). ``params`` holds the numeric case parameters used for plots
    (e.g. ``{"seqlen": 4096}``).
    """

    suite: str
    case: str
    impl: str
    metric: str
    value: float | None
    ms: float | None = None
    ceiling_frac: float | None = None
    rel_err: float | None = None
    note: str = ""
    params: dict = field(default_factory=dict)

    @property
    def speed_figure(self) -> bool:
        """False for a row timed in the Triton interpreter (see ``INTERPRETER_NOTE``)."""
        return not self.note.startswith(INTERPRETER_NOTE)

    def to_dict(self) -> dict:
        return asdict(self)


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``‖out−ref‖/‖ref‖`` computed in fp64 (0 when both are zero)."""
    out64, ref64 = out.detach().double(), ref.detach().double()
    denom = ref64.norm().item()
    diff = (out64 - ref64).norm().item()
    return diff / denom if denom > 0 else diff


def synchronize(device: str | torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_ms(fn: Callable[[], object], device: str | torch.device, *, quick: bool = False,
            best: bool = False) -> float:
    """Median milliseconds per call of ``fn`` (``best``: the fastest call).

    On CUDA: ``triton.testing.do_bench`` (CUDA events, L2 flushed between calls).
    On CPU: a warm-up call, then repeated calls timed with ``perf_counter``.
    """
    if torch.device(device).type == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=10 if quick else 25, rep=30 if quick else 100,
                              return_mode="min" if best else "median"))
    fn()
    times: list[float] = []
    budget_s = 0.2 if quick else 1.0
    start = time.perf_counter()
    while len(times) < 3 or (time.perf_counter() - start < budget_s and len(times) < 50):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return times[0] if best else times[len(times) // 2]


def measure_ceilings(device: str | torch.device, *, quick: bool = False) -> Ceilings:
    """Measure copy bandwidth and matmul throughput on ``device``."""
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        nbytes = 1 << (28 if quick else 30)
        dtype = torch.bfloat16
        n = 4096 if quick else 8192
    else:
        import platform

        name = f"CPU {platform.processor() or platform.machine()} x{torch.get_num_threads()}"
        nbytes = 1 << 27
        dtype = torch.float32
        n = 1024 if quick else 2048
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    # Ceilings take the fastest call: they are what the device can do, and a shared
    # machine's slow moments are not that (one median here once halved the matmul peak).
    copy_ms = time_ms(lambda: dst.copy_(src), device, quick=quick, best=True)
    bandwidth = 2 * nbytes / (copy_ms * 1e-3) / 1e9
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    from llm_engine import ops  # here: the bench CLI picks TRITON_INTERPRET before kernels load

    mm_ms = time_ms(lambda: ops.linear(a, b), device, quick=quick, best=True)
    tflops = 2 * n**3 / (mm_ms * 1e-3) / 1e12
    return Ceilings(device_name=name, bandwidth_gbps=bandwidth, matmul_tflops=tflops)
