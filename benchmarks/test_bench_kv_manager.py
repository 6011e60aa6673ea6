"""pytest-benchmark: the KV-cache block manager, C++ against pure Python
(``llm_engine.bench.kv_manager`` has the full table with ops/s and speed-ups).
Host-side code, so the same cases run with or without a GPU."""

from __future__ import annotations

import pytest

from llm_engine.bench.kv_manager import IMPLS, decode_cycle, make_prompts, prefix_manager, prefix_round

BATCH, PROMPT, STEPS = 64, 256, 64
SYSTEM, SUFFIX, REQUESTS = 2048, 16, 64


@pytest.mark.parametrize("impl", list(IMPLS))
def test_bench_kv_manager_decode_cycle(benchmark, impl):
    prompts = make_prompts(BATCH, PROMPT, seed=0)
    out: list = []
    benchmark(decode_cycle, IMPLS[impl], prompts, STEPS, True, None)
    decode_cycle(IMPLS[impl], prompts, STEPS, True, out)
    assert len(out) == 3 + 4 * STEPS


@pytest.mark.parametrize("impl", list(IMPLS))
def test_bench_kv_manager_prefix_lookup(benchmark, impl):
    system = make_prompts(1, SYSTEM, seed=1)[0]
    prompts = [system + s for s in make_prompts(REQUESTS, SUFFIX, seed=2)]
    bm = prefix_manager(IMPLS[impl], system, REQUESTS, SUFFIX)
    benchmark(prefix_round, bm, prompts, None)
    out: list = []
    prefix_round(bm, prompts, out)
    assert [int(c[0]) for c in out[::2]] == [SYSTEM] * REQUESTS
