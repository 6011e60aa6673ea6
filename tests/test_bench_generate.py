"""The generate suite's quantized-weights rows on a tiny model: decode throughput against
concurrency and time to first token against prompt length, for every implementation in
the same run, with the peer's install note when llama-cpp-python is absent; their plot
panels and axis labels."""

from __future__ import annotations

import pytest
from testing_utils import require_default_model

from llm_engine import LLM
from llm_engine.bench import generate, plots
from llm_engine.bench.common import OURS, Ceilings
from llm_engine.config import ModelConfig
from llm_engine.model import Transformer

pytestmark = pytest.mark.usefixtures("one_cpu_thread")


@pytest.fixture(scope="module")
def engines():
    require_default_model()
    from llm_engine.loader import load_model

    tokenizer = load_model("smollm2")[1]
    fp32 = Transformer(ModelConfig(arch="llama", vocab_size=tokenizer.vocab_size, hidden_size=64,
                                   num_layers=1, num_heads=2, num_kv_heads=1,
                                   intermediate_size=64, max_position_embeddings=128)).eval()
    quantized = Transformer(fp32.config).eval()
    quantized.load_state_dict(fp32.state_dict())
    quantized.quantize("q8_0")
    llm = LLM.from_modules(quantized, tokenizer, kv_cache_memory=1 << 22,
                           enable_prefix_caching=False)
    return llm, fp32


SIZES = generate._Sizes(decode_new=3, tp_requests=2, tp_in=4, tp_out=2, hf_batch=2, repeats=1)
CEILINGS = Ceilings("cpu", 10.0, 0.1)


def test_concurrency_and_ttft_rows_cover_each_level_and_note_the_missing_peer(
        engines, monkeypatch) -> None:
    llm, fp32 = engines
    monkeypatch.setattr(generate, "STREAMS", (1, 3))
    monkeypatch.setattr(generate, "TTFT_LENGTHS", (5, 9))
    rows = generate._concurrency_rows(llm, fp32, None, None, "cpu", SIZES, CEILINGS)
    rows += generate._ttft_rows(llm, fp32, None, None, "cpu", SIZES)
    measured = {(r.case, r.impl) for r in rows if r.value is not None}
    cases = [f"decode throughput streams={n}" for n in (1, 3)]
    cases += [f"time to first token prompt={n}" for n in (5, 9)]
    assert measured == {(c, f"{OURS}-{kind}") for c in cases for kind in ("quantized", "fp32")}
    assert all(r.value > 0 for r in rows if r.value is not None)
    missing = [r for r in rows if r.value is None]
    assert {r.case for r in missing} == set(cases)
    assert all("pip install llama-cpp-python" in r.note for r in missing)
    quantized = next(r for r in rows if r.case == cases[1] and r.impl.endswith("quantized"))
    assert quantized.params["streams"] == 3 and f"x {OURS}-fp32" in quantized.note
    panels = plots._suite_panels(rows, plots.PLOT_SPECS["generate"])
    labels = {p["title"]: p["x_label"] for p in panels.values()}
    assert labels == {"decode throughput": "concurrent streams",
                      "time to first token": "prompt length (tokens)"}
