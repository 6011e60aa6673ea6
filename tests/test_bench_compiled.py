"""The benchmark report's "compiled" section (llm_engine.bench.compiled)."""

from __future__ import annotations

from pathlib import Path

from llm_engine.bench import compiled
from llm_engine.bench.report import Report

ROW = {"kernel": "attention.fwd", "shape": "smollm2-135m", "dtype": "bf16",
       "config": "BLOCK_M=128 BLOCK_N=64 num_warps=4 num_stages=3", "quick": True, "arch": 90,
       "registers": 168, "spill_bytes": 0, "stack_bytes": 0, "shared_bytes": 24576,
       "wgmma": True, "seconds": 5.0, "triton": "3.9.0"}


def test_quick_cpu_runs_skip_compiling_and_full_ones_compile_the_sample_for_sm90():
    assert compiled.compile_flags("cpu", quick=True) is None
    assert compiled.compile_flags("cpu", quick=False) == ["--sample"]
    rows, note = compiled.compile_rows("cpu", quick=True, budget_s=1.0)
    assert rows == [] and "make gpu-compile" in note


def test_section_lists_registers_spills_shared_memory_and_wgmma():
    lines = compiled.markdown([ROW], "the sample")
    assert lines[0] == "## compiled"
    table = [line for line in lines if line.startswith("| attention.fwd")]
    assert table == ["| attention.fwd | smollm2-135m | bf16 | BLOCK_M=128 BLOCK_N=64 num_warps=4 "
                     "num_stages=3 | sm_90 | 168 | 0 | 0 | 24.0 | yes |"]


def test_report_carries_the_section_in_markdown_and_json():
    report = Report(device="cpu", quick=False, out_dir=Path("."), env={"device_name": "CPU"},
                    compiled=[ROW], compiled_note="the sample")
    assert "## compiled" in report.to_markdown()
    assert report.to_json()["compiled"] == {"note": "the sample", "rows": [ROW]}
