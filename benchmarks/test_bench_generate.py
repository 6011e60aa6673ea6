"""pytest-benchmark: generation through the engine on SmolLM2 (``llm_engine.bench.generate``
has the table against HF transformers with TTFT/TPOT percentiles and ceiling fractions).
On CUDA: greedy decode at batch 1 and 64 (bf16, CUDA graphs); on CPU: a few greedy tokens
at batch 1 and 4 (fp32)."""

from __future__ import annotations

import pytest
import torch

from llm_engine import LLM, SamplingParams
from llm_engine.bench.generate import PROMPT, random_prompts

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM("smollm2", device=DEVICE, enable_prefix_caching=False,
               kv_cache_memory=None if CUDA else 1 << 28)


@pytest.mark.parametrize("batch", [1, 64] if CUDA else [1, 4])
def test_bench_generate_greedy_decode(benchmark, llm, batch):
    new = 64 if CUDA else 4
    ids = llm.tokenizer.encode(PROMPT)
    prompts = [ids] if batch == 1 else random_prompts(batch, 32, llm.model.config.vocab_size)
    params = SamplingParams(temperature=0, max_tokens=new, ignore_eos=True)
    outs = benchmark.pedantic(lambda: llm.generate(prompts, params, use_tqdm=False),
                              rounds=3, iterations=1, warmup_rounds=1)
    assert all(len(o.outputs[0].token_ids) == new for o in outs)
