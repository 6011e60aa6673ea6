"""The engine releases KV blocks that fall out of a sliding window.

When every layer attends over the last ``WINDOW`` tokens, a sequence's blocks wholly
before its next query's window go back to the pool after each step, so a long
generation holds at most ``ceil(WINDOW / BS) + 1`` blocks between steps, and the
tokens stay those of the same engine that releases nothing and of the model run
without any cache. A model where some layer sees every token releases nothing.
(``tests/test_families.py`` checks an all-window Mistral through the engine against
HF's ``generate``.)
"""

from __future__ import annotations

import pytest
import torch
from testing_utils import greedy_without_cache

from llm_engine import LLM, SamplingParams
from llm_engine.config import ModelConfig
from llm_engine.loader import load_model
from llm_engine.model import Transformer

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

WINDOW, BS = 16, 4
BOUND = -(-WINDOW // BS) + 1  # blocks a decoding sequence holds between steps
PROMPTS = [
    "The quick brown fox jumps over the lazy dog. " * 2,
    "Hello there, how are you?",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "a",
]


@pytest.fixture(scope="module")
def tokenizer():
    return load_model("smollm2")[1]


def random_model(tokenizer, **window) -> Transformer:
    gen = torch.Generator().manual_seed(3)
    config = ModelConfig(arch="llama", vocab_size=tokenizer.vocab_size, hidden_size=64,
                         num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=96,
                         max_position_embeddings=256, **window)
    m = Transformer(config)
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return m.eval()


@pytest.fixture(scope="module")
def model(tokenizer) -> Transformer:
    return random_model(tokenizer, sliding_window=WINDOW)  # every layer


def make_llm(model, tokenizer, release: bool = True, **kwargs) -> LLM:
    kwargs.setdefault("kv_cache_memory", 256 * kv_block_bytes(model))
    llm = LLM.from_modules(model, tokenizer, block_size=BS, **kwargs)
    if not release:
        llm.engine.scheduler.kv_window = None
    return llm


def kv_block_bytes(model) -> int:
    c = model.config
    return 2 * c.num_layers * BS * c.num_kv_heads * c.head_dim * 4


def held_blocks(llm: LLM) -> int:
    bm = llm.engine.block_manager
    return bm.num_blocks - bm.num_free_blocks


def run_tracking_blocks(llm: LLM, ids: list[int], params: SamplingParams):
    """Generate step by step; returns (token ids, blocks held after each step)."""
    engine = llm.engine
    request = engine.add_request(None, ids, params)
    held = []
    while engine.has_unfinished():
        engine.step()
        held.append(held_blocks(llm))
    return request.to_output().outputs[0].token_ids, held




def assert_all_blocks_free(llm: LLM) -> None:
    bm = llm.engine.block_manager
    assert len(bm) == 0 and bm.num_free_blocks == bm.num_blocks
    assert not llm.engine.has_unfinished()


def test_long_generation_holds_a_bounded_number_of_blocks(model, tokenizer) -> None:
    ids = tokenizer.encode(PROMPTS[0])
    params = SamplingParams(temperature=0, max_tokens=110, ignore_eos=True)
    for caching in (False, True):
        llm = make_llm(model, tokenizer, enable_prefix_caching=caching,
                       max_num_batched_tokens=8, max_num_seqs=8)  # chunked prefill
        assert llm.engine.scheduler.kv_window == WINDOW
        tokens, held = run_tracking_blocks(llm, ids, params)
        assert max(held[-100:]) <= BOUND  # decode: the window's blocks, not the sequence's
        assert_all_blocks_free(llm)
        keep = make_llm(model, tokenizer, release=False, enable_prefix_caching=caching,
                        max_num_batched_tokens=8, max_num_seqs=8)
        kept_tokens, kept = run_tracking_blocks(keep, ids, params)
        assert max(kept) == -(-(len(ids) + 109) // BS)  # without release: every block
        assert tokens == kept_tokens
        assert_all_blocks_free(keep)
    assert tokens == greedy_without_cache(model, ids, 110)


def test_prefix_cache_forks_and_preemption_with_released_blocks(model, tokenizer) -> None:
    greedy = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    reference = make_llm(model, tokenizer, release=False, enable_prefix_caching=False)
    expected = [o.outputs[0].token_ids for o in reference.generate(PROMPTS, greedy,
                                                                    use_tqdm=False)]
    # 16 blocks: every request fits alone (the longest needs 15 without release), the
    # four together do not, even releasing.
    small = make_llm(model, tokenizer, kv_cache_memory=16 * kv_block_bytes(model),
                     max_num_seqs=4, max_num_batched_tokens=12)
    outs = small.generate(PROMPTS, greedy, use_tqdm=False)
    assert small.stats().num_preemptions > 0
    assert [o.outputs[0].token_ids for o in outs] == expected
    assert_all_blocks_free(small)
    # Released prompt blocks stay in the prefix cache: a second run hits them.
    roomy = make_llm(model, tokenizer, max_num_seqs=8, max_num_batched_tokens=12)
    roomy.generate(PROMPTS, greedy, use_tqdm=False)
    again = roomy.generate(PROMPTS, greedy, use_tqdm=False)
    assert again[0].num_cached_tokens == 20  # 5 blocks released by the first run
    assert [o.outputs[0].token_ids for o in again] == expected
    # n = 2: both completions share the prompt's blocks, each releases its own references.
    forks = roomy.generate(PROMPTS, SamplingParams(n=2, temperature=0, max_tokens=40,
                                                   ignore_eos=True), use_tqdm=False)
    assert [[c.token_ids for c in o.outputs] for o in forks] == [[e, e] for e in expected]
    assert_all_blocks_free(roomy)


def test_the_native_decoder_stack_of_a_quantized_model_skips_released_blocks(tokenizer) -> None:
    model = random_model(tokenizer, sliding_window=WINDOW)
    model.quantize("q8_0")
    llm = make_llm(model, tokenizer)
    assert llm.engine.runner.decoder is not None  # decode steps run in one C++ call
    ids = tokenizer.encode(PROMPTS[1])
    params = SamplingParams(temperature=0, max_tokens=3 * WINDOW, ignore_eos=True)
    tokens, held = run_tracking_blocks(llm, ids, params)
    assert max(held[1:]) <= BOUND
    keep = make_llm(model, tokenizer, release=False)
    assert tokens == run_tracking_blocks(keep, ids, params)[0]


@pytest.mark.parametrize("window", [dict(sliding_window=WINDOW, window_layers=[1]), {}],
                         ids=["some-layers", "none"])
def test_a_model_with_a_full_attention_layer_releases_nothing(tokenizer, window) -> None:
    model = random_model(tokenizer, **window)
    llm = make_llm(model, tokenizer)
    assert llm.engine.scheduler.kv_window is None
    ids = tokenizer.encode(PROMPTS[1])
    params = SamplingParams(temperature=0, max_tokens=3 * WINDOW, ignore_eos=True)
    tokens, held = run_tracking_blocks(llm, ids, params)
    assert max(held) == -(-(len(ids) + 3 * WINDOW - 1) // BS)
    assert tokens == greedy_without_cache(model, ids, 3 * WINDOW)
    assert_all_blocks_free(llm)
