"""One benchmark run's report: the environment, the ceilings, every row, and how
our implementation compares with each reference; written as ``report.md`` and
``report.json``.
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import torch

from llm_engine.bench.common import OURS, Ceilings, Row
from llm_engine.bench.compiled import markdown as compiled_markdown

REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass
class SuiteStatus:
    """How one suite's run ended: ``ok``, ``failed`` (it raised), ``missing`` (its
    module is not there), ``timeout`` (stopped at its time budget), ``interrupted``
    (Ctrl-C while it ran) or ``not run`` (Ctrl-C before it started)."""

    name: str
    status: str
    seconds: float = 0.0
    error: str = ""


@dataclass
class Report:
    """Everything one run measured; ``files`` lists what was written to ``out_dir``."""

    device: str
    quick: bool
    out_dir: Path
    env: dict
    ceilings: Ceilings | None = None
    rows: list[Row] = field(default_factory=list)
    suites: list[SuiteStatus] = field(default_factory=list)
    interrupted: bool = False
    notes: list[str] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)
    compiled: list[dict] = field(default_factory=list)  # llm_engine.bench.compiled rows
    compiled_note: str = ""

    def speedups(self) -> list[float | None]:
        """For each row, ours ÷ this row's throughput on the same (suite, case)."""
        return ours_speedups(self.rows)

    def to_json(self) -> dict:
        speedups = self.speedups()
        return {
            "device": self.device,
            "quick": self.quick,
            "interrupted": self.interrupted,
            "env": self.env,
            "ceilings": asdict(self.ceilings) if self.ceilings else None,
            "suites": [asdict(s) for s in self.suites],
            "summary": summary(self.rows),
            "notes": self.notes,
            "compiled": {"note": self.compiled_note, "rows": self.compiled},
            "rows": [{**row.to_dict(), "ours_speedup": s}
                     for row, s in zip(self.rows, speedups, strict=True)],
        }

    def to_markdown(self, plots: dict[str, str] | None = None) -> str:
        """The report as markdown; ``plots`` maps a suite to its image's file name."""
        return render_markdown(self, plots or {})


def ours_speedups(rows: list[Row]) -> list[float | None]:
    """For each row: our value ÷ its value on the same (suite, case), when both exist.

    Every metric is a throughput (higher is better), so a figure above 1 means
    our implementation is faster than that one. Our own rows get ``None``, and so
    does every row of a case where ours is no speed figure (the Triton interpreter).
    """
    ours: dict[tuple[str, str, str], float] = {}
    for row in rows:
        if row.impl == OURS and _usable(row.value) and row.speed_figure:
            ours.setdefault((row.suite, row.case, row.metric), row.value)
    out: list[float | None] = []
    for row in rows:
        mine = ours.get((row.suite, row.case, row.metric))
        if row.impl == OURS or mine is None or not _usable(row.value) or row.value == 0:
            out.append(None)
        else:
            out.append(mine / row.value)
    return out


def summary(rows: list[Row]) -> list[dict]:
    """Per (suite, reference): how many cases compare, and ours ÷ reference as
    a geometric mean and a minimum over them."""
    groups: dict[tuple[str, str], list[float]] = {}
    for row, s in zip(rows, ours_speedups(rows), strict=True):
        if s is not None and s > 0:
            groups.setdefault((row.suite, row.impl), []).append(s)
    return [
        {"suite": suite, "reference": impl, "cases": len(vals),
         "geomean": math.exp(sum(math.log(v) for v in vals) / len(vals)), "min": min(vals)}
        for (suite, impl), vals in groups.items()
    ]


def environment(device: str) -> dict:
    """Where and with what the run happened: versions, device, date and commit."""
    env: dict = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "commit": _git_commit(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "triton": _package_version("triton"),
        "cuda": torch.version.cuda,
        "cpu": platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "device": device,
    }
    if torch.device(device).type == "cuda":
        props = torch.cuda.get_device_properties(torch.device(device))
        env.update(
            device_name=props.name,
            compute_capability=f"{props.major}.{props.minor}",
            sm_count=props.multi_processor_count,
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            driver=_nvidia_driver(),
        )
    else:
        env["device_name"] = f"CPU {env['cpu']}"
    return env


def render_markdown(report: Report, plots: dict[str, str]) -> str:
    env = report.env
    c = report.ceilings
    lines = [f"# llm_engine benchmarks on {env.get('device_name', report.device)}", ""]
    if report.interrupted:
        lines += ["**Interrupted: this report holds only the rows measured before Ctrl-C.**", ""]
    versions = ", ".join(f"{k} {env[k]}" for k in ("torch", "triton", "cuda", "driver", "python")
                         if env.get(k))
    lines += [
        "| | |",
        "|---|---|",
        f"| device | {env.get('device_name', report.device)} ({report.device}) |",
        f"| date | {env.get('date')} |",
        f"| commit | {env.get('commit') or 'unknown'} |",
        f"| versions | {versions} |",
        f"| mode | {'quick (tiny shapes)' if report.quick else 'full'} |",
    ]
    if c is not None:
        lines.append(f"| ceilings | copy bandwidth {_fmt_num(c.bandwidth_gbps)} GB/s, "
                     f"matmul {_fmt_num(c.matmul_tflops)} TFLOP/s "
                     f"({'bf16' if report.device.startswith('cuda') else 'fp32'}) |")
    lines.append("")
    for note in report.notes:
        lines += [f"> {note}", ""]

    rows_summary = summary(report.rows)
    if rows_summary:
        lines += ["## Summary: ours vs each reference", "",
                  f"Throughput of `{OURS}` ÷ the reference's, over the cases both ran "
                  "(above 1: ours is faster).", "",
                  "| suite | reference | cases | geomean | min |", "|---|---|---:|---:|---:|"]
        lines += [f"| {s['suite']} | {s['reference']} | {s['cases']} | {s['geomean']:.2f}× "
                  f"| {s['min']:.2f}× |" for s in rows_summary]
        lines.append("")

    speedups = report.speedups()
    by_suite: dict[str, list[tuple[Row, float | None]]] = {}
    for row, s in zip(report.rows, speedups, strict=True):
        by_suite.setdefault(row.suite, []).append((row, s))
    statuses = {s.name: s for s in report.suites}
    for suite, pairs in by_suite.items():
        status = statuses.get(suite)
        took = f" ({status.seconds:.1f} s)" if status else ""
        lines += [f"## {suite}{took}", "",
                  "| case | impl | value | ms | % of ceiling | ours vs this | rel err | note |",
                  "|---|---|---:|---:|---:|---:|---:|---|"]
        for row, s in pairs:
            impl = f"**{row.impl}**" if row.impl == OURS else row.impl
            value = f"{_fmt_num(row.value)} {row.metric}" if _usable(row.value) else "—"
            ms = _fmt_num(row.ms) if _usable(row.ms) else "—"
            frac = f"{100 * row.ceiling_frac:.3g}%" if _usable(row.ceiling_frac) else "—"
            ratio = f"{s:.2f}×" if s is not None else "—"
            err = f"{row.rel_err:.1e}" if _usable(row.rel_err) else "—"
            lines.append(f"| {_cell(row.case)} | {_cell(impl)} | {value} | {ms} | {frac} | {ratio} "
                         f"| {err} | {_cell(row.note)} |")
        lines.append("")
        if suite in plots:
            lines += [f"![{suite}]({plots[suite]})", ""]
    if report.compiled_note:
        lines += compiled_markdown(report.compiled, report.compiled_note)
    return "\n".join(lines)


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename, so a reader
    (or an interrupted run) never sees half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_report(report: Report, plots: dict[str, str]) -> list[Path]:
    """Write ``report.md`` and ``report.json`` into ``report.out_dir``; return their paths."""
    md, js = report.out_dir / "report.md", report.out_dir / "report.json"
    write_text_atomic(js, json.dumps(report.to_json(), indent=1, default=str) + "\n")
    write_text_atomic(md, report.to_markdown(plots) + "\n")
    return [md, js]


def _usable(x: float | None) -> bool:
    return x is not None and math.isfinite(x)


def _fmt_num(x: float) -> str:
    ax = abs(x)
    if ax >= 1000:
        return f"{x:,.0f}"
    if ax >= 100:
        return f"{x:.1f}"
    if ax >= 1:
        return f"{x:.2f}"
    return f"{x:.3g}"


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _run(cmd: list[str]) -> str | None:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip()


def _git_commit() -> str | None:
    """``LLM_ENGINE_COMMIT`` when set (a copy of the tree without ``.git``), else
    the checkout's HEAD, marked ``+dirty`` when tracked files changed."""
    if os.environ.get("LLM_ENGINE_COMMIT"):
        return os.environ["LLM_ENGINE_COMMIT"]
    head = _run(["git", "-C", str(REPO_ROOT), "rev-parse", "--short=12", "HEAD"])
    if not head:
        return None
    dirty = _run(["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--untracked-files=no"])
    return f"{head}+dirty" if dirty else head


def _nvidia_driver() -> str | None:
    out = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    return out.splitlines()[0].strip() if out else None
