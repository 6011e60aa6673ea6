"""Kernels compiled ahead of time for sm_90 and sm_80 with the installed Triton's ptxas.

No GPU needed: ``llm_engine.kernels.compile_table`` compiles a sample of the launch
configurations in a subprocess (the kernels in this process are built for the
interpreter) and reports registers, spills, shared memory and wgmma use. The whole
table is ``make gpu-compile``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest
import triton
from llm_engine.kernels._utils import AUTOTUNE_ENV, tuning_choices

SMEM_LIMIT = {90: 227 * 1024, 80: 163 * 1024}
WGMMA_ON_SM90 = ("attention.fwd", "attention.dkdv", "attention.dq", "paged.prefill")


def _has_ptxas() -> bool:
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        return Path(get_ptxas(90).path).exists()
    except Exception:  # noqa: BLE001 - any failure means there is no CUDA toolchain to use
        return False


needs_ptxas = pytest.mark.skipif(not _has_ptxas(), reason="Triton's CUDA backend has no ptxas")


def _run_table(tmp_path: Path, *flags: str) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "table.json"
    proc = subprocess.run(
        [sys.executable, "-m", "llm_engine.kernels.compile_table", *flags, "--json", str(out)],
        env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> list[dict]:
    return _run_table(tmp_path_factory.mktemp("compile"), "--sample", "--jobs", "2")


@needs_ptxas
def test_sample_covers_every_family_and_both_architectures(sample):
    kernels = {r["kernel"].split(".")[0] for r in sample}
    assert kernels == {"attention", "paged", "sampling", "layer_norm", "cross_entropy"}
    assert {r["arch"] for r in sample} == {80, 90}
    assert all(r["triton"] == triton.__version__ for r in sample)


@needs_ptxas
def test_no_register_spills_on_16_bit_paths_and_in_sampling(sample):
    checked = [r for r in sample if r["dtype"] in ("bf16", "fp16")
               or r["kernel"].startswith("sampling.")]
    assert checked
    spilling = [(r["kernel"], r["shape"], r["dtype"], r["config"], r["spill_bytes"])
                for r in checked if r["spill_bytes"] or r["stack_bytes"]]
    assert not spilling


@needs_ptxas
def test_shared_memory_fits_each_architecture(sample):
    over = [(r["kernel"], r["shape"], r["dtype"], r["arch"], r["shared_bytes"])
            for r in sample if r["shared_bytes"] > SMEM_LIMIT[r["arch"]]]
    assert not over


@needs_ptxas
def test_attention_and_paged_prefill_use_wgmma_on_sm90(sample):
    wanted = [r for r in sample if r["arch"] == 90 and r["kernel"] in WGMMA_ON_SM90
              and r["dtype"] in ("bf16", "fp16")]
    assert {r["kernel"] for r in wanted} == set(WGMMA_ON_SM90)
    assert [r["kernel"] for r in wanted if not r["wgmma"]] == []
    assert all(r["registers"] > 0 for r in sample)


@needs_ptxas
def test_quick_autotune_keeps_one_or_two_configs_of_the_full_list(tmp_path):
    entries = _run_table(tmp_path, "--list")
    full, quick = defaultdict(set), defaultdict(set)
    for r in entries:
        key = (r["kernel"], r["shape"], r["dtype"])
        full[key].add(r["config"])
        if r["quick"]:
            quick[key].add(r["config"])
    assert len(full) >= 17 * 3 * 3
    for key, configs in full.items():
        assert 1 <= len(quick[key]) <= 2, key
        assert quick[key] <= configs, key


def test_tuning_choices_follow_the_environment(monkeypatch):
    configs = [1, 2, 3, 4]
    monkeypatch.delenv(AUTOTUNE_ENV, raising=False)
    assert tuning_choices(configs, lambda c: c % 2 == 0) == configs
    monkeypatch.setenv(AUTOTUNE_ENV, "quick")
    assert tuning_choices(configs, lambda c: c % 2 == 0) == [2, 4]
    assert tuning_choices(configs, lambda c: False) == [1]
    monkeypatch.setenv(AUTOTUNE_ENV, "full")
    assert tuning_choices(configs, lambda c: c == 3) == configs
