"""Run benchmark suites and write one report.

A suite is a module named in ``SUITES`` exposing
``run(device, quick, ceilings) -> list[Row]`` (or, optionally, a generator
``iter_rows(device, quick, ceilings)`` yielding the same rows one at a time, so
that rows measured before a time budget or Ctrl-C stops the suite are kept).
A suite whose module is missing, or that raises, still shows up in the report as
a row whose note says why. ``suite_options`` passes keyword options to the suites
that take them (the generate suite's ``ab``).
"""

from __future__ import annotations

import contextlib
import importlib
import math
import signal
import threading
import time
import traceback
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from tqdm import tqdm

from llm_engine.bench.common import Ceilings, Row, measure_ceilings
from llm_engine.bench.plots import write_plots
from llm_engine.bench.report import Report, SuiteStatus, environment, write_report

SUITES: dict[str, str] = {
    "layer_norm": "llm_engine.bench.layer_norm",
    "attention": "llm_engine.bench.attention",
    "sampling": "llm_engine.bench.sampling",
    "paged_attention": "llm_engine.bench.paged_attention",
    "linear": "llm_engine.bench.linear",
    "cpu_layer_ops": "llm_engine.bench.cpu_layer_ops",
    "kv_manager": "llm_engine.bench.kv_manager",
    "generate": "llm_engine.bench.generate",
    "train": "llm_engine.bench.train",
}
"""Suite name → module path."""

GROUPS: dict[str, tuple[str, ...]] = {
    "kernels": ("layer_norm", "attention", "sampling", "paged_attention", "linear",
                "cpu_layer_ops", "kv_manager"),
    "generate": ("generate",),
    "train": ("train",),
}
"""Group name → suites; ``"all"`` means every suite in ``SUITES``."""

_RATE_CEILINGS = {"GB/s": "bandwidth_gbps", "TFLOP/s": "matmul_tflops"}


class BudgetExceeded(BaseException):
    """Raised inside a suite when its time budget runs out (a ``BaseException`` so
    a suite's ``except Exception`` around an optional reference cannot swallow it)."""


def resolve_suites(which: str | list[str]) -> list[str]:
    """Expand group names (``kernels``, ``all``...) into suite names, in order."""
    names: list[str] = []
    for item in [which] if isinstance(which, str) else which:
        if item == "all":
            names += list(SUITES)
        elif item in GROUPS:
            names += GROUPS[item]
        elif item in SUITES:
            names.append(item)
        else:
            choices = ", ".join(["all", *GROUPS, *SUITES])
            raise ValueError(f"unknown benchmark suite or group {item!r}; choose from {choices}")
    return list(dict.fromkeys(names))


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def run_benchmarks(
    which: str | list[str] = "all",
    device: str | None = None,
    quick: bool = False,
    out_dir: str | Path = "out/bench",
    profile: bool = False,
    *,
    budget_s: float | Mapping[str, float] | None = None,
    ceilings: Ceilings | None = None,
    progress: bool = True,
    suite_options: Mapping[str, Mapping[str, object]] | None = None,
) -> Report:
    """Measure the device's ceilings, run each suite, and write the report.

    ``which``: suite or group names (see ``SUITES`` and ``GROUPS``). ``budget_s``:
    seconds each suite may run (one number for all, or suite → seconds with an
    optional ``"default"``); a suite past its budget is stopped and noted.
    ``profile``: write a Chrome trace ``trace_<suite>.json`` of each suite.
    ``ceilings``: skip measuring them (tests). ``progress``: a progress bar on a
    terminal. ``suite_options``: suite -> keyword options for its ``iter_rows``/``run``
    (``{"generate": {"ab": [("rms_norm", ("cpp", "reference"))]}}``). The report (``report.md``,
    ``report.json``, one PNG per plotted suite) is rewritten after every suite,
    so a run stopped by Ctrl-C keeps the rows already measured; the returned
    report then has ``interrupted`` set.
    """
    names = resolve_suites(which)
    device = device or default_device()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = Report(device=device, quick=quick, out_dir=out, env=environment(device))
    plotted: dict[str, Path] = {}
    try:
        report.ceilings = ceilings or measure_ceilings(device, quick=quick)
        bar = tqdm(names, desc="bench", unit="suite", disable=None if progress else True)
        for name in bar:
            bar.set_postfix_str(name)
            _run_suite(report, name, _budget_for(budget_s, name), profile,
                       (suite_options or {}).get(name, {}))
            _write(report, [name], plotted)
    except KeyboardInterrupt:
        report.interrupted = True
        ran = {s.name for s in report.suites}
        for name in names:
            if name not in ran:
                report.suites.append(SuiteStatus(name, "not run"))
                report.rows.append(_note_row(name, "not run: the run was interrupted (Ctrl-C)"))
    _write(report, [n for n in names if n not in plotted] if report.interrupted else [], plotted)
    return report


def _budget_for(budget_s: float | Mapping[str, float] | None, name: str) -> float | None:
    if budget_s is None or isinstance(budget_s, (int, float)):
        return budget_s
    return budget_s.get(name, budget_s.get("default"))


def _note_row(suite: str, note: str) -> Row:
    return Row(suite=suite, case="(suite)", impl="—", metric="", value=None, note=note)


def _run_suite(report: Report, name: str, budget: float | None, profile: bool,
               options: Mapping[str, object]) -> None:
    """Append the suite's rows and status to ``report``; re-raises Ctrl-C after
    recording what was measured."""
    path = SUITES[name]
    start = time.perf_counter()
    rows: list[Row] = []
    status = SuiteStatus(name, "ok")
    try:
        try:
            module = importlib.import_module(path)
        except ModuleNotFoundError as e:
            if e.name != path:
                raise
            status.status, status.error = "missing", f"module {path} does not exist"
            rows.append(_note_row(name, f"suite not run: module {path} does not exist"))
            return
        with _profiling(profile, report, name), _time_budget(budget):
            producer = getattr(module, "iter_rows", None)
            if producer is not None:
                for row in producer(report.device, report.quick, report.ceilings, **options):
                    rows.append(row)
            else:
                rows.extend(module.run(report.device, report.quick, report.ceilings, **options))
        for row in rows:
            if not isinstance(row, Row):
                raise TypeError(f"suite {name} returned a {type(row).__name__}, expected Row")
    except BudgetExceeded:
        status.status = "timeout"
        status.error = f"stopped after its time budget of {budget:g} s"
        rows.append(_note_row(name, f"suite stopped after its time budget of {budget:g} s; "
                                    f"{len(rows)} rows measured before are kept"))
    except KeyboardInterrupt:
        status.status, status.error = "interrupted", "Ctrl-C"
        rows.append(_note_row(name, f"suite interrupted (Ctrl-C); {len(rows)} rows measured "
                                    "before are kept"))
        raise
    except Exception as e:  # a broken suite must show in the report, not end the run
        status.status, status.error = "failed", traceback.format_exc()
        first = " ".join(str(e).split())[:300]
        rows = [r for r in rows if isinstance(r, Row)]
        rows.append(_note_row(name, f"suite failed: {type(e).__name__}: {first}"))
    finally:
        status.seconds = time.perf_counter() - start
        report.suites.append(status)
        report.rows.extend(_complete(row, report.ceilings) for row in rows)


def _complete(row: Row, ceilings: Ceilings | None) -> Row:
    """Fill the fraction of the ceiling for GB/s and TFLOP/s rows that lack it, and
    say so when a measured row carries no correctness figure and no note."""
    attr = _RATE_CEILINGS.get(row.metric)
    if (row.ceiling_frac is None and attr and ceilings is not None and row.value is not None
            and math.isfinite(row.value)):
        row.ceiling_frac = row.value / getattr(ceilings, attr)
    if row.rel_err is None and not row.note:
        row.note = ("no correctness figure reported by the suite" if row.value is not None
                    else "not measured, and the suite gave no reason")
    return row


@contextlib.contextmanager
def _time_budget(seconds: float | None) -> Iterator[None]:
    """Raise ``BudgetExceeded`` in this thread after ``seconds`` (SIGALRM: main
    thread on POSIX only; elsewhere the budget is not enforced)."""
    if seconds is None or threading.current_thread() is not threading.main_thread() \
            or not hasattr(signal, "setitimer"):
        yield
        return

    def expire(_signum: int, _frame: object) -> None:
        raise BudgetExceeded

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@contextlib.contextmanager
def _profiling(enabled: bool, report: Report, name: str) -> Iterator[None]:
    """With ``enabled``, record the suite with torch.profiler and write
    ``trace_<name>.json`` (Chrome trace format) even when the suite stops early."""
    if not enabled:
        yield
        return
    from torch.profiler import ProfilerActivity, profile, record_function

    activities = [ProfilerActivity.CPU]
    if torch.device(report.device).type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    prof = profile(activities=activities, record_shapes=True)
    try:
        with prof, record_function(f"bench:{name}"):
            yield
    finally:
        path = report.out_dir / f"trace_{name}.json"
        tmp = path.with_name(f".{path.name}.tmp")
        prof.export_chrome_trace(str(tmp))
        tmp.replace(path)
        report.files.append(path)


def _write(report: Report, new_suites: list[str], plotted: dict[str, Path]) -> None:
    if new_suites:
        try:
            plotted.update(write_plots(report.rows, new_suites, report.ceilings, report.out_dir))
        except ImportError as e:  # matplotlib is a dev dependency
            note = f"plots not drawn: {e}"
            if note not in report.notes:
                report.notes.append(note)
    paths = write_report(report, {suite: p.name for suite, p in plotted.items()})
    report.files = list(dict.fromkeys([*paths, *plotted.values(), *report.files]))
