"""The engine on a small mixture-of-experts model and a small sliding-window model:
batching, chunked prefill, the prefix cache and preemption change no greedy token,
and no cache block leaks."""

from __future__ import annotations

import random

import pytest
import torch
from testing_utils import greedy_without_cache

from llm_engine import LLM, SamplingParams
from llm_engine.config import ModelConfig
from llm_engine.loader import load_model
from llm_engine.model import Transformer

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

PROMPTS = [
    "Hello there, how are you?",
    "a",
    "The quick brown fox jumps over the lazy dog. " * 3,
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "You are a helpful assistant. Answer briefly. Name a colour.",
    "You are a helpful assistant. Answer briefly. Name a colour. And a fruit?",
]
FAMILIES = {
    # Mixtral-like: 5 experts, 2 per token, renormalised weights.
    "moe": dict(num_experts=5, num_experts_per_tok=2, moe_intermediate_size=48),
    # Mistral/Qwen2-like: a 12-token window on the second layer, Qwen2's q/k/v biases.
    "window": dict(sliding_window=12, window_layers=[1], qkv_bias=True),
}


@pytest.fixture(scope="module")
def tokenizer():
    return load_model("smollm2")[1]


@pytest.fixture(scope="module", params=list(FAMILIES))
def model(request, tokenizer) -> Transformer:
    gen = torch.Generator().manual_seed(7)
    config = ModelConfig(arch="llama", vocab_size=tokenizer.vocab_size, hidden_size=64,
                         num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=96,
                         max_position_embeddings=256, **FAMILIES[request.param])
    m = Transformer(config)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
            elif name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return m.eval()


def make_llm(model, tokenizer, **kwargs) -> LLM:
    kwargs.setdefault("kv_cache_memory", 1 << 22)
    return LLM.from_modules(model, tokenizer, **kwargs)


def assert_all_blocks_free(llm: LLM) -> None:
    bm = llm.engine.block_manager
    assert len(bm) == 0 and bm.num_free_blocks == bm.num_blocks
    assert not llm.engine.has_unfinished()




def test_batched_chunked_greedy_equals_each_prompt_alone_and_no_cache(model, tokenizer) -> None:
    rng = random.Random(0)
    prompts = PROMPTS + [p[: rng.randint(1, len(p))] for p in PROMPTS[2:4]]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    alone = []
    for p in prompts:
        llm = make_llm(model, tokenizer, enable_prefix_caching=False)
        alone.append(llm.generate(p, params, use_tqdm=False)[0].outputs[0].token_ids)
    ids = tokenizer.encode(PROMPTS[2])
    assert alone[2] == greedy_without_cache(model, ids, 16)  # past the window
    llm = make_llm(model, tokenizer, max_num_seqs=8, max_num_batched_tokens=24)
    together = llm.generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in together] == alone
    assert_all_blocks_free(llm)


def test_prefix_cache_and_preemption_change_nothing_and_leak_no_block(model, tokenizer) -> None:
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    reference = make_llm(model, tokenizer, enable_prefix_caching=False).generate(
        PROMPTS, params, use_tqdm=False)
    block_bytes = 2 * model.config.num_layers * 16 * model.config.num_kv_heads \
        * model.config.head_dim * 4
    small = make_llm(model, tokenizer, kv_cache_memory=10 * block_bytes, max_num_seqs=6,
                     max_num_batched_tokens=48)
    outs = small.generate(PROMPTS, params, use_tqdm=False)
    again = small.generate(PROMPTS[4:], params, use_tqdm=False)  # shared prefixes cached
    assert small.stats().num_preemptions > 0
    expected = [o.outputs[0].token_ids for o in reference]
    assert [o.outputs[0].token_ids for o in outs] == expected
    assert [o.outputs[0].token_ids for o in again] == expected[4:]
    assert_all_blocks_free(small)
