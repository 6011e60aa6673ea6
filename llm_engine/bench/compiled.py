"""The benchmark report's "compiled" section: the kernels' compile table for the run.

On a CUDA device the configurations ``LLM_ENGINE_AUTOTUNE=quick`` launches are
compiled for that device's architecture; elsewhere the small sample of
``tests/test_compile.py`` is compiled ahead of time for sm_90. Quick CPU runs skip
it (``make gpu-compile`` prints the whole table). The compiler runs in a
subprocess (the benchmark process may hold interpreter-built kernels) under a time
budget; a run that does not finish leaves a note instead of rows.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

KERNEL_SUITES = ("layer_norm", "attention", "sampling", "paged_attention")
"""Suites that run Triton kernels: the section is added when one of them ran."""

COLUMNS = ("kernel", "shape", "dtype", "config", "sm", "regs", "spills (B)", "stack (B)",
           "smem (KB)", "wgmma")


def compile_flags(device: str, quick: bool) -> list[str] | None:
    """The compile-table command-line flags for this run, or None to skip the section."""
    dev = torch.device(device)
    if dev.type == "cuda":
        major, minor = torch.cuda.get_device_capability(dev)
        return ["--quick", "--arch", str(major * 10 + minor)]
    if quick:
        return None
    return ["--sample"]


def compile_rows(device: str, quick: bool, budget_s: float) -> tuple[list[dict], str]:
    """Compile the table for this run: (one dict per entry, a note on what was compiled)."""
    flags = compile_flags(device, quick)
    if flags is None:
        return [], "not compiled in a quick CPU run (`make gpu-compile` prints the whole table)"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    with tempfile.TemporaryDirectory(prefix="llm-engine-bench-") as tmp:
        out = Path(tmp) / "compiled.json"
        cmd = [sys.executable, "-m", "llm_engine.kernels.compile_table", *flags,
               "--jobs", str(os.cpu_count() or 1), "--json", str(out)]
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True,
                                  timeout=budget_s)
        except subprocess.TimeoutExpired:
            return [], f"not compiled: the compile table took more than {budget_s:g} s"
        if not out.exists():
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            return [], f"not compiled: the compile table failed ({last[:300]})"
        rows = json.loads(out.read_text())
    what = ("the configurations LLM_ENGINE_AUTOTUNE=quick launches" if "--quick" in flags
            else "the sample of tests/test_compile.py, ahead of time")
    triton_version = rows[0]["triton"] if rows else "?"
    return rows, f"{what}, compiled with Triton {triton_version}'s ptxas"


def markdown(rows: list[dict], note: str) -> list[str]:
    """The section's markdown lines."""
    lines = ["## compiled", "", note + ".", ""]
    if not rows:
        return lines
    lines += ["| " + " | ".join(COLUMNS) + " |",
              "|---|---|---|---|---|---:|---:|---:|---:|---|"]
    for r in rows:
        cells = [r["kernel"], r["shape"], r["dtype"], r["config"], f"sm_{r['arch']}",
                 str(r["registers"]), str(r["spill_bytes"]), str(r["stack_bytes"]),
                 f"{r['shared_bytes'] / 1024:.1f}", "yes" if r["wgmma"] else ""]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    return lines
