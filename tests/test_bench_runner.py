"""The benchmark runner: report structure, ratios, failing/missing suites, time
budgets, Ctrl-C, profiling, the CLI; with fake suites and one real suite on CPU."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import types

import pytest
import torch

from llm_engine.bench import plots, runner
from llm_engine.bench.cli import add_bench_parsers, handle
from llm_engine.bench.common import OURS, Ceilings, Row
from llm_engine.bench.profile import build_workload, profile_kernel

CEILINGS = Ceilings(device_name="test CPU", bandwidth_gbps=10.0, matmul_tflops=0.5)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _fake_rows(device: str, quick: bool, ceilings: Ceilings) -> list[Row]:
    rows = []
    for n in (256, 512, 1024):
        for impl, speed in ((OURS, 4.0), ("torch", 2.0)):
            rows.append(Row("fake", f"fwd n={n}", impl, "GB/s", speed * n / 1024, ms=1.0,
                            rel_err=1e-6, params={"n": n}))
    rows.append(Row("fake", "fwd n=1024", "optional_lib", "GB/s", None, params={"n": 1024},
                    note="optional_lib not installed"))
    return rows


def _broken(device: str, quick: bool, ceilings: Ceilings) -> list[Row]:
    raise RuntimeError("kernel exploded")


def _interrupted(device: str, quick: bool, ceilings: Ceilings):
    yield Row("stream", "first", OURS, "GB/s", 1.0, rel_err=0.0)
    raise KeyboardInterrupt


def _slow(device: str, quick: bool, ceilings: Ceilings):
    yield Row("slow", "first", OURS, "GB/s", 1.0, rel_err=0.0)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        time.sleep(0.01)
    yield Row("slow", "never", OURS, "GB/s", 1.0, rel_err=0.0)


def _no_correctness(device: str, quick: bool, ceilings: Ceilings) -> list[Row]:
    return [Row("bare", "case", OURS, "GB/s", 5.0, ms=1.0)]


@pytest.fixture
def fake_suites(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    def module(name: str, **attrs: object) -> str:
        mod = types.ModuleType(f"_fake_bench_{name}")
        for key, value in attrs.items():
            setattr(mod, key, value)
        monkeypatch.setitem(sys.modules, mod.__name__, mod)
        return mod.__name__

    suites = {
        "fake": module("fake", run=_fake_rows),
        "broken": module("broken", run=_broken),
        "missing": "llm_engine.bench._no_such_suite",
        "stream": module("stream", iter_rows=_interrupted, run=_broken),
        "slow": module("slow", iter_rows=_slow),
        "bare": module("bare", run=_no_correctness),
    }
    monkeypatch.setattr(runner, "SUITES", suites)
    monkeypatch.setattr(runner, "GROUPS", {"good": ("fake", "bare")})
    monkeypatch.setitem(plots.PLOT_SPECS, "fake", plots.PlotSpec("Fake", "n (elements)",
                                                                 (("n",),)))
    return suites


def _run(tmp_path, which, **kwargs) -> runner.Report:
    kwargs.setdefault("ceilings", CEILINGS)
    return runner.run_benchmarks(which, device="cpu", quick=True, out_dir=tmp_path,
                                 progress=False, **kwargs)


def _json(tmp_path) -> dict:
    return json.loads((tmp_path / "report.json").read_text())


def _assert_every_row_has_correctness_or_note(data: dict) -> None:
    for row in data["rows"]:
        assert row["rel_err"] is not None or row["note"], row


def test_report_writes_markdown_json_and_plots_with_ratios(fake_suites, tmp_path):
    report = _run(tmp_path, ["good"])

    assert {p.name for p in report.files} == {"report.md", "report.json", "fake.png"}
    assert (tmp_path / "fake.png").read_bytes().startswith(PNG_MAGIC)
    md = (tmp_path / "report.md").read_text()
    assert "## fake" in md and "## bare" in md and "![fake](fake.png)" in md
    assert "| fwd n=512 | torch | 1.00 GB/s | 1.00 | 10% | 2.00× | 1.0e-06 |" in md

    data = _json(tmp_path)
    for key in ("device_name", "date", "commit", "torch", "triton", "python", "cuda"):
        assert key in data["env"]
    assert data["ceilings"]["bandwidth_gbps"] == 10.0
    assert [s["status"] for s in data["suites"]] == ["ok", "ok"]
    _assert_every_row_has_correctness_or_note(data)
    fake_rows = [r for r in data["rows"] if r["suite"] == "fake"]
    assert [r["ours_speedup"] for r in fake_rows if r["impl"] == "torch"] == [2.0, 2.0, 2.0]
    assert all(r["ours_speedup"] is None for r in fake_rows if r["impl"] != "torch")
    assert {r["ceiling_frac"] for r in fake_rows if r["impl"] == OURS} == {0.1, 0.2, 0.4}
    assert data["summary"] == [{"suite": "fake", "reference": "torch", "cases": 3,
                                "geomean": pytest.approx(2.0), "min": 2.0}]


def test_row_without_correctness_figure_gets_a_note(fake_suites, tmp_path):
    _run(tmp_path, ["bare"])
    (row,) = _json(tmp_path)["rows"]
    assert row["rel_err"] is None
    assert "no correctness figure" in row["note"]


def test_failing_and_missing_suites_show_as_noted_rows(fake_suites, tmp_path):
    report = _run(tmp_path, ["broken", "fake", "missing"])

    assert [(s.name, s.status) for s in report.suites] == [
        ("broken", "failed"), ("fake", "ok"), ("missing", "missing")]
    assert "kernel exploded" in report.suites[0].error
    data = _json(tmp_path)
    notes = {r["suite"]: r["note"] for r in data["rows"] if r["case"] == "(suite)"}
    assert notes["broken"] == "suite failed: RuntimeError: kernel exploded"
    assert "llm_engine.bench._no_such_suite does not exist" in notes["missing"]
    md = (tmp_path / "report.md").read_text()
    assert "## broken" in md and "## missing" in md
    _assert_every_row_has_correctness_or_note(data)


def test_ctrl_c_keeps_rows_measured_before_and_notes_the_rest(fake_suites, tmp_path):
    report = _run(tmp_path, ["fake", "stream", "bare"])

    assert report.interrupted
    assert [(s.name, s.status) for s in report.suites] == [
        ("fake", "ok"), ("stream", "interrupted"), ("bare", "not run")]
    data = _json(tmp_path)
    assert data["interrupted"] is True
    assert sum(r["suite"] == "fake" for r in data["rows"]) == 7
    stream = [r for r in data["rows"] if r["suite"] == "stream"]
    assert [r["case"] for r in stream] == ["first", "(suite)"]
    assert "1 rows measured before are kept" in stream[1]["note"]
    assert "Interrupted" in (tmp_path / "report.md").read_text()


def test_time_budget_stops_a_suite_and_keeps_its_rows(fake_suites, tmp_path):
    start = time.monotonic()
    report = _run(tmp_path, ["slow", "fake"], budget_s={"slow": 0.3, "default": 30})

    assert time.monotonic() - start < 5
    assert [(s.name, s.status) for s in report.suites] == [("slow", "timeout"), ("fake", "ok")]
    slow = [r for r in report.rows if r.suite == "slow"]
    assert [r.case for r in slow] == ["first", "(suite)"]
    assert "time budget of 0.3 s" in slow[1].note


def test_profile_writes_a_chrome_trace_per_suite(fake_suites, tmp_path):
    report = _run(tmp_path, ["fake"], profile=True)
    trace = tmp_path / "trace_fake.json"
    assert trace in report.files
    assert "traceEvents" in json.loads(trace.read_text())


def test_unknown_suite_is_an_error(fake_suites):
    with pytest.raises(ValueError, match="unknown benchmark suite or group 'nope'"):
        runner.resolve_suites(["nope"])
    assert runner.resolve_suites(["fake", "all"])[:2] == ["fake", "broken"]


def test_plot_panels_split_by_later_factor_when_product_sizes_repeat():
    spec = plots.PLOT_SPECS["layer_norm"]
    rows = [Row("layer_norm", f"fwd {r}x{h}", OURS, "GB/s", 1.0, params={"rows": r, "hidden": h})
            for r, h in ((4096, 4096), (16384, 1024), (8192, 1024))]
    panels = plots._suite_panels(rows, spec)
    assert sorted(p["title"] for p in panels.values()) == ["fwd, hidden=1024", "fwd, hidden=4096"]


def test_plot_panel_ignores_other_words_that_spell_the_x_value():
    attention = [Row("attention", f"fwd causal d=64 T={t}", OURS, "TFLOP/s", 1.0,
                     params={"seqlen": t}) for t in (64, 512, 1024)]
    (panel,) = plots._suite_panels(attention, plots.PLOT_SPECS["attention"]).values()
    assert panel["title"] == "fwd causal d=64"
    assert panel["series"][OURS] == [(64.0, 1.0), (512.0, 1.0), (1024.0, 1.0)]
    generate = [Row("generate", f"decode smollm2 batch={b}", OURS, "tok/s", 1.0,
                    params={"batch": b}) for b in (1, 2, 4)]
    (panel,) = plots._suite_panels(generate, plots.PLOT_SPECS["generate"]).values()
    assert panel["title"] == "decode smollm2"
    assert len(panel["series"][OURS]) == 3


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    add_bench_parsers(parser.add_subparsers(dest="command", required=True))
    return handle(parser.parse_args(argv))


def test_cli_bench_prints_the_table_and_fails_when_a_suite_raises(fake_suites, tmp_path, capsys):
    assert _cli(["bench", "fake", "--device", "cpu", "--quick", "--out", str(tmp_path)]) == 0
    assert "| fwd n=256 | **llm_engine** |" in capsys.readouterr().out
    assert (tmp_path / "report.json").exists()
    assert _cli(["bench", "broken", "--device", "cpu", "--quick", "--out", str(tmp_path)]) == 1


def test_a_real_suite_runs_quick_on_cpu_with_measured_ceilings(tmp_path):
    report = runner.run_benchmarks(["kv_manager"], device="cpu", quick=True, out_dir=tmp_path,
                                   progress=False)

    (status,) = report.suites
    assert status.status == "ok", status.error
    assert report.ceilings.bandwidth_gbps > 0 and report.ceilings.matmul_tflops > 0
    data = _json(tmp_path)
    assert any(r["impl"] == OURS and r["value"] for r in data["rows"])
    _assert_every_row_has_correctness_or_note(data)


def test_bench_cli_loads_no_kernel_before_it_picks_the_interpreter():
    """``llm-engine bench --device cpu`` sets TRITON_INTERPRET, which Triton reads when a
    kernel module is imported: importing the CLI must not import the kernels."""
    code = ("import sys, llm_engine.cli, llm_engine.bench.cli, llm_engine.bench.runner; "
            "print([m for m in sys.modules if m.startswith('llm_engine.kernels')])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_profile_kernel_runs_the_loop_and_prints_the_ncu_command(capsys):
    assert _cli(["profile-kernel", "layer_norm", "--shape", "8,32", "--iters", "2",
                 "--warmup", "1", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "ncu --profile-from-start off" in out
    assert "profile-kernel layer_norm --shape 8,32 --dtype fp32 --iters 2" in out


def test_profile_kernel_rejects_a_shape_of_the_wrong_rank(capsys):
    assert _cli(["profile-kernel", "layer_norm", "--shape", "2,3,4", "--device", "cpu"]) == 2
    assert "ROWS,HIDDEN" in capsys.readouterr().err


@pytest.mark.parametrize(("name", "shape", "backward"), [
    ("layer_norm", (4, 32), True),
    ("rms_norm", (4, 32), False),
    ("attention", (1, 16, 2, 32), False),
    ("sampling", (2, 64), False),
    ("paged_attention", (2, 20, 4, 16, 2), False),
])
def test_profile_kernel_workloads_call_each_kernel(name, shape, backward):
    workload = build_workload(name, shape, torch.float32, "cpu", backward)
    assert profile_kernel(workload, "cpu", iters=1, warmup=0) > 0


def test_interpreter_rows_are_left_out_of_every_speed_comparison() -> None:
    from llm_engine.bench.common import INTERPRETER_NOTE
    from llm_engine.bench.report import ours_speedups, summary

    rows = [Row("k", "timed", OURS, "GB/s", 4.0, rel_err=0.0),
            Row("k", "timed", "torch", "GB/s", 2.0, rel_err=0.0),
            Row("k", "interp", OURS, "GB/s", 0.001, rel_err=0.0, note=INTERPRETER_NOTE),
            Row("k", "interp", "torch", "GB/s", 2.0, rel_err=0.0)]
    assert ours_speedups(rows) == [None, 2.0, None, None]
    assert summary(rows) == [{"suite": "k", "reference": "torch", "cases": 1, "geomean": 2.0,
                              "min": 2.0}]
    assert rows[0].speed_figure and not rows[2].speed_figure
