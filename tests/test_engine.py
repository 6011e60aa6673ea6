"""Engine behaviour on a tiny random-weight Llama with the SmolLM2 tokenizer (fast on CPU).

The weights are scaled up so logits are peaked: greedy decoding then has no
near-ties, and batched and unbatched fp32 runs must agree token for token.
"""

import copy
import random

import pytest
import torch
from testing_utils import greedy_without_cache, require_default_model

from llm_engine import LLM, SamplingParams
from llm_engine.config import ModelConfig
from llm_engine.engine import engine as engine_module
from llm_engine.engine.config import EngineConfig
from llm_engine.engine.detokenizer import IncrementalDetokenizer
from llm_engine.engine.engine import kv_block_bytes
from llm_engine.engine.sampler import Sampler
from llm_engine.engine.sequence import Request, Sequence
from llm_engine.loader import load_model
from llm_engine.model import Transformer
from llm_engine.tokenizer import Tokenizer

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

CONTEXT = 256
GREEDY = SamplingParams(temperature=0, max_tokens=12)


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    require_default_model()
    return load_model("smollm2")[1]


def random_llama(seed: int, **config) -> Transformer:
    """A small Llama with N(0, 0.2) matrices: its greedy outputs vary from prompt to prompt."""
    gen = torch.Generator().manual_seed(seed)
    m = Transformer(ModelConfig(arch="llama", max_position_embeddings=CONTEXT, **config))
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return m.eval()


@pytest.fixture(scope="module")
def model(tokenizer) -> Transformer:
    return random_llama(1234, vocab_size=tokenizer.vocab_size, hidden_size=64, num_layers=2,
                        num_heads=4, num_kv_heads=2, intermediate_size=128)


def make_llm(model, tokenizer, **kwargs) -> LLM:
    kwargs.setdefault("kv_cache_memory", 1 << 22)
    return LLM.from_modules(model, tokenizer, **kwargs)


def assert_all_blocks_free(llm: LLM) -> None:
    bm = llm.engine.block_manager
    assert len(bm) == 0
    assert bm.num_free_blocks == bm.num_blocks
    assert len(llm.engine.scheduler) == 0 and not llm.engine.has_unfinished()


PROMPTS = [
    "Hello there, how are you?",
    "a",
    "The quick brown fox jumps over the lazy dog. " * 6,
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "You are a helpful assistant. Answer briefly. What is two plus two?",
    "You are a helpful assistant. Answer briefly. Name a colour.",
    "You are a helpful assistant. Answer briefly. Name a colour. And a fruit?",
    "Unicode: héllo wörld, 世界, 🙂🙂",
    "1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23 24 25 26 27 28 29 30",
    "Short",
    "   whitespace   runs\t\tand\n\nnewlines   ",
    "The capital of France is",
]




def test_greedy_matches_recomputing_without_cache(model, tokenizer):
    llm = make_llm(model, tokenizer)
    for prompt in PROMPTS[:3]:
        out = llm.generate(prompt, GREEDY, use_tqdm=False)[0]
        ref = greedy_without_cache(model, tokenizer.encode(prompt), GREEDY.max_tokens)
        assert out.outputs[0].token_ids == ref


def test_generate_returns_outputs_in_prompt_order_with_counts(model, tokenizer):
    llm = make_llm(model, tokenizer)
    outs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert [o.prompt for o in outs] == PROMPTS
    for o in outs:
        assert o.finished
        assert o.prompt_token_ids == tokenizer.encode(o.prompt)
        (c,) = o.outputs
        assert c.index == 0 and c.finish_reason == "length"
        assert len(c.token_ids) == GREEDY.max_tokens
        assert c.text == tokenizer.decode(c.token_ids)
        assert o.metrics.ttft > 0 and o.metrics.tpot > 0
    stats = llm.stats()
    assert stats.num_generated_tokens == GREEDY.max_tokens * len(PROMPTS)
    assert stats.generation_tokens_per_s > 0
    assert_all_blocks_free(llm)


def test_token_id_prompts_are_accepted(model, tokenizer):
    llm = make_llm(model, tokenizer)
    ids = tokenizer.encode(PROMPTS[0])
    by_ids = llm.generate([ids, ids[:3]], GREEDY, use_tqdm=False)
    by_text = llm.generate(PROMPTS[0], GREEDY, use_tqdm=False)
    assert by_ids[0].prompt is None and by_ids[0].prompt_token_ids == ids
    assert by_ids[0].outputs[0].token_ids == by_text[0].outputs[0].token_ids
    assert llm.generate(ids, GREEDY, use_tqdm=False)[0].prompt_token_ids == ids


def test_batched_greedy_equals_each_prompt_alone(model, tokenizer):
    rng = random.Random(0)
    prompts = PROMPTS + [p[: rng.randint(1, len(p))] for p in PROMPTS for _ in range(2)]
    params = SamplingParams(temperature=0, max_tokens=10)
    alone = []
    for p in prompts:
        llm = make_llm(model, tokenizer, enable_prefix_caching=False)
        alone.append(llm.generate(p, params, use_tqdm=False)[0].outputs[0].token_ids)
    # Small token budget: prompts are chunked and mixed with other requests' decodes.
    llm = make_llm(model, tokenizer, max_num_seqs=16, max_num_batched_tokens=48)
    together = llm.generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in together] == alone
    assert_all_blocks_free(llm)


def test_chunked_prefill_matches_whole_prefill(model, tokenizer):
    prompt = PROMPTS[2] * 2
    whole = make_llm(model, tokenizer).generate(prompt, GREEDY, use_tqdm=False)[0]
    llm = make_llm(model, tokenizer, max_num_seqs=4, max_num_batched_tokens=7)
    chunked = llm.generate(prompt, GREEDY, use_tqdm=False)[0]
    assert chunked.outputs[0].token_ids == whole.outputs[0].token_ids
    assert llm.stats().num_steps > len(chunked.prompt_token_ids) // 7


def test_prefix_cache_serves_a_shared_system_prompt(model, tokenizer):
    llm = make_llm(model, tokenizer)
    system = "You are a careful assistant. " * 8
    first = llm.generate(system + "Question one?", GREEDY, use_tqdm=False)[0]
    second = llm.generate(system + "Question two?", GREEDY, use_tqdm=False)[0]
    assert first.num_cached_tokens == 0
    assert second.num_cached_tokens >= 16 and second.num_cached_tokens % 16 == 0
    assert llm.stats().prefix_cache_hit_rate > 0
    fresh = make_llm(model, tokenizer, enable_prefix_caching=False)
    ref = fresh.generate(system + "Question two?", GREEDY, use_tqdm=False)[0]
    assert second.outputs[0].token_ids == ref.outputs[0].token_ids
    assert_all_blocks_free(llm)


def test_preemption_with_a_tiny_cache_gives_the_same_outputs(model, tokenizer):
    params = SamplingParams(temperature=0, max_tokens=24)
    large = make_llm(model, tokenizer).generate(PROMPTS, params, use_tqdm=False)
    per_block = kv_block_bytes(model, 16)
    small = make_llm(model, tokenizer, kv_cache_memory=12 * per_block, max_num_seqs=8,
                     max_num_batched_tokens=64)
    outs = small.generate(PROMPTS, params, use_tqdm=False)
    assert small.stats().num_preemptions > 0
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in large]
    assert_all_blocks_free(small)


def test_seeded_request_gives_the_same_tokens_alone_or_batched(model, tokenizer):
    params = SamplingParams(temperature=0.9, top_k=50, top_p=0.95, max_tokens=16, seed=42)
    alone = make_llm(model, tokenizer).generate(PROMPTS[0], params, use_tqdm=False)[0]
    others = [SamplingParams(temperature=1.0, max_tokens=8, seed=i) for i in range(4)]
    llm = make_llm(model, tokenizer)
    batched = llm.generate(PROMPTS[1:5] + [PROMPTS[0]], others + [params], use_tqdm=False)
    assert batched[-1].outputs[0].token_ids == alone.outputs[0].token_ids
    other_seed = SamplingParams(temperature=0.9, top_k=50, top_p=0.95, max_tokens=16, seed=43)
    different = llm.generate(PROMPTS[0], other_seed, use_tqdm=False)[0]
    assert different.outputs[0].token_ids != alone.outputs[0].token_ids


def test_unseeded_requests_are_reproducible_from_the_engine_seed(model, tokenizer):
    params = SamplingParams(temperature=1.0, max_tokens=16)
    a = make_llm(model, tokenizer, seed=5).generate(PROMPTS[:3], params, use_tqdm=False)
    b = make_llm(model, tokenizer, seed=5).generate(PROMPTS[:3], params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in a] == [o.outputs[0].token_ids for o in b]


def test_n_completions_fork_the_prompt_and_sample_independently(model, tokenizer):
    llm = make_llm(model, tokenizer)
    params = SamplingParams(n=3, temperature=1.0, max_tokens=12, seed=7)
    out = llm.generate(PROMPTS[2], params, use_tqdm=False)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    texts = {tuple(c.token_ids) for c in out.outputs}
    assert len(texts) == 3
    # The prompt ran once: n - 1 completions reused its blocks.
    assert llm.stats().num_prompt_tokens == len(out.prompt_token_ids)
    again = make_llm(model, tokenizer).generate(PROMPTS[2], params, use_tqdm=False)[0]
    assert [c.token_ids for c in again.outputs] == [c.token_ids for c in out.outputs]
    greedy = llm.generate(PROMPTS[2], SamplingParams(n=2, temperature=0, max_tokens=12),
                          use_tqdm=False)[0]
    assert greedy.outputs[0].token_ids == greedy.outputs[1].token_ids
    assert_all_blocks_free(llm)


def test_requests_that_fork_never_run_more_than_max_num_seqs(model, tokenizer):
    llm = make_llm(model, tokenizer, max_num_seqs=4)
    engine = llm.engine
    ids = tokenizer.encode("Count with me:")
    for i, n in enumerate((4, 2, 1)):
        engine.add_request(None, ids, SamplingParams(n=n, temperature=1.0, seed=i, max_tokens=5))
    most = 0
    while engine.has_unfinished():
        engine.step()
        most = max(most, len(engine.scheduler.running))
    assert most == 4
    assert_all_blocks_free(llm)


def test_stop_string_spanning_tokens_is_found_and_cut(model, tokenizer):
    llm = make_llm(model, tokenizer)
    params = SamplingParams(temperature=0, max_tokens=20)
    free = llm.generate(PROMPTS[0], params, use_tqdm=False)[0].outputs[0]
    ids = free.token_ids
    # A stop string made of the end of token 5 and the start of token 6.
    head, tail = tokenizer.decode(ids[:6]), tokenizer.decode(ids[:7])
    stop = head[-2:] + tail[len(head):len(head) + 2]
    assert len(stop) >= 3
    cut = free.text.index(stop)
    stopped = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=20, stop=stop),
                           use_tqdm=False)[0].outputs[0]
    assert stopped.finish_reason == "stop" and stopped.stop_reason == stop
    assert stopped.text == free.text[:cut]
    assert stopped.token_ids == ids[:len(stopped.token_ids)] and len(stopped.token_ids) < 20
    deltas = list(llm.stream(PROMPTS[0], SamplingParams(temperature=0, max_tokens=20, stop=stop)))
    assert "".join(deltas) == stopped.text


def test_eos_stops_and_stays_in_token_ids_but_not_text(model, tokenizer):
    ids = make_llm(model, tokenizer).generate(PROMPTS[3], GREEDY, use_tqdm=False)[0] \
        .outputs[0].token_ids
    eos = ids[4]
    k = ids.index(eos)
    with_eos = Tokenizer(tokenizer.hf, tokenizer.bos_token_id, eos, tokenizer.chat_template)
    llm = make_llm(model, with_eos)
    out = llm.generate(PROMPTS[3], GREEDY, use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason is None
    assert out.token_ids == ids[:k + 1]
    assert out.text == tokenizer.decode(ids[:k])
    ignoring = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    out = llm.generate(PROMPTS[3], ignoring, use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "length" and out.token_ids == ids


def test_stop_token_ids_end_the_completion(model, tokenizer):
    llm = make_llm(model, tokenizer)
    ids = llm.generate(PROMPTS[4], GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    stop_id = ids[3]
    k = ids.index(stop_id)
    params = SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[stop_id])
    out = llm.generate(PROMPTS[4], params, use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop_id
    assert out.token_ids == ids[:k + 1] and out.text == tokenizer.decode(ids[:k])


def test_stream_deltas_concatenate_to_the_generated_text(model, tokenizer):
    llm = make_llm(model, tokenizer)
    for prompt in PROMPTS[:4]:
        params = SamplingParams(temperature=0.8, max_tokens=24, seed=3)
        deltas = list(llm.stream(prompt, params))
        assert len(deltas) > 1
        assert "".join(deltas) == llm.generate(prompt, params, use_tqdm=False)[0].outputs[0].text
    assert_all_blocks_free(llm)


def test_closing_a_stream_early_aborts_the_request(model, tokenizer):
    llm = make_llm(model, tokenizer)
    it = llm.stream(PROMPTS[0], SamplingParams(temperature=0, max_tokens=50))
    next(it)
    it.close()
    assert_all_blocks_free(llm)


def test_detokenizer_holds_back_split_characters(tokenizer):
    text = "héllo wörld 世界 🙂🙂 ok"
    ids = tokenizer.encode(text)
    taken: list[int] = []
    detok = IncrementalDetokenizer(tokenizer, taken, incremental=True)
    deltas = []
    for t in ids:
        taken.append(t)
        assert detok.advance() is None
        deltas.append(detok.stream_delta(finished=False))
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)
    assert any(len(tokenizer.decode([t])) and "\ufffd" in tokenizer.decode([t]) for t in ids)


def test_detokenizer_holds_back_a_possible_stop_string_until_it_is_ruled_out(tokenizer):
    taken: list[int] = []
    detok = IncrementalDetokenizer(tokenizer, taken, stop=("END!",))
    pieces = ["The", " story", " E", "N", "X", " then", " EN", "D", "!", " more"]
    streamed = []
    matched = None
    for p in pieces:
        (t,) = tokenizer.encode(p) if len(tokenizer.encode(p)) == 1 else (None,)
        if t is None:
            pytest.skip(f"{p!r} is not one token")
        taken.append(t)
        matched = detok.advance()
        streamed.append(detok.stream_delta(finished=matched is not None))
        if matched:
            break
    assert matched == "END!"
    assert detok.text == "The story ENX then "
    assert streamed[2:4] == [" ", ""]  # "E", then "EN" could start "END!"
    assert streamed[4] == "ENX"
    assert "".join(streamed) == detok.text


def test_chat_uses_the_chat_template(model, tokenizer):
    llm = make_llm(model, tokenizer)
    convo = [{"role": "user", "content": "Hi!"}]
    (out,) = llm.chat(convo, GREEDY, use_tqdm=False)
    expected = tokenizer.encode(tokenizer.apply_chat_template(convo), add_bos=False)
    assert out.prompt_token_ids == expected
    two = llm.chat([convo, [{"role": "user", "content": "Bye"}]], GREEDY, use_tqdm=False)
    assert len(two) == 2 and two[0].outputs[0].token_ids == out.outputs[0].token_ids


def test_logprobs_hold_the_sampled_and_the_top_tokens(model, tokenizer):
    llm = make_llm(model, tokenizer)
    out = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=6, logprobs=3),
                       use_tqdm=False)[0].outputs[0]
    assert len(out.logprobs) == 6
    for token, entry in zip(out.token_ids, out.logprobs, strict=True):
        assert token in entry and 3 <= len(entry) <= 4
        assert all(v <= 0 for v in entry.values())
        assert entry[token] == max(entry.values())  # greedy takes the most likely token
    assert llm.generate(PROMPTS[0], GREEDY, use_tqdm=False)[0].outputs[0].logprobs is None


def test_penalties_follow_their_definitions(tokenizer):
    params = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25, repetition_penalty=2.0)
    request = Request("r", None, 1, params, seeds=[0])
    seq = Sequence(0, request, 0, 0, [3, 5, 5, 7], tokenizer, incremental=False)
    logits = torch.tensor([[1.0, 2.0, 3.0, 4.0, -1.0, 6.0, 0.5, -2.0]])
    expected = logits.clone()
    expected[0, 3] = 4.0 / 2  # prompt token, positive logit: divided
    expected[0, 5] = 6.0 / 2 - 0.5 - 2 * 0.25
    expected[0, 7] = -2.0 * 2 - 0.5 - 0.25  # negative logit: multiplied
    Sampler._apply_penalties(logits, [seq], [0])
    torch.testing.assert_close(logits, expected)


@pytest.fixture(scope="module")
def small_vocab_model() -> Transformer:
    """A tiny model over the first 2048 token ids: sampling it on CPU is cheap."""
    return random_llama(99, vocab_size=2048, hidden_size=32, num_layers=2, num_heads=2,
                        num_kv_heads=1, intermediate_size=64)


def test_soak_with_mixed_params_aborts_and_preemption_leaks_no_block(small_vocab_model,
                                                                     tokenizer):
    rng = random.Random(0)
    llm = make_llm(small_vocab_model, tokenizer, max_num_seqs=12, max_num_batched_tokens=64,
                   kv_cache_memory=20 * kv_block_bytes(small_vocab_model, 16))
    engine = llm.engine
    finished = 0
    live: list[str] = []
    for i in range(200):
        ids = [rng.randrange(2048) for _ in range(rng.randint(1, 40))]
        params = SamplingParams(
            n=rng.choice([1, 1, 2, 3]), temperature=rng.choice([0.0, 0.7, 1.0]),
            top_k=rng.choice([0, 20]), top_p=rng.choice([1.0, 0.9]), min_p=rng.choice([0, 0.05]),
            max_tokens=rng.randint(1, 40), stop=rng.choice([None, None, "e!", ["th", "\n\n"]]),
            seed=rng.choice([None, i]), logprobs=rng.choice([None, 1]),
            repetition_penalty=rng.choice([1.0, 1.3]), ignore_eos=rng.random() < 0.5)
        live.append(engine.add_request(None, ids, params).request_id)
        for _ in range(rng.randint(0, 3)):
            for r in engine.step():
                finished += r.finished
        if rng.random() < 0.15:
            engine.abort(rng.choice(live))
    while engine.has_unfinished():
        for r in engine.step():
            finished += r.finished
    assert finished > 150
    assert engine.scheduler.num_preemptions > 0
    assert_all_blocks_free(llm)


@pytest.mark.parametrize("prompt, match", [
    ("", "prompt"),
    ([], "prompt"),
    ([1, 2, 10**9], "token ids"),
    ("word " * (CONTEXT + 10), "longer than the model's context"),
    ("ok \ud800 no", "prompt is not valid Unicode: lone surrogate U\\+D800 at index 3"),
])
def test_bad_prompts_raise_value_errors(model, tokenizer, prompt, match):
    llm = make_llm(model, tokenizer)
    with pytest.raises(ValueError, match=match):
        llm.generate([prompt] if prompt == [] else prompt, GREEDY, use_tqdm=False)
    assert_all_blocks_free(llm)


def test_bad_arguments_raise_clear_errors(model, tokenizer):
    llm = make_llm(model, tokenizer, max_num_seqs=4)
    with pytest.raises(TypeError, match="sampling_params"):
        llm.generate("hi", {"temperature": 0}, use_tqdm=False)
    with pytest.raises(ValueError, match="sampling_params has 1 entries for 2 prompts"):
        llm.generate(["a", "b"], [GREEDY], use_tqdm=False)
    with pytest.raises(ValueError, match="max_num_seqs"):
        llm.generate("hi", SamplingParams(n=5), use_tqdm=False)
    with pytest.raises(ValueError, match="n must be 1"):
        llm.stream("hi", SamplingParams(n=2))
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        make_llm(model, tokenizer, max_num_seqs=8, max_num_batched_tokens=4)
    with pytest.raises(ValueError, match="logprobs = 100000 exceeds the vocabulary size"):
        llm.generate("hi", SamplingParams(logprobs=100000), use_tqdm=False)
    with pytest.raises(ValueError, match=r"messages\[0\]\['content'\] is not valid Unicode"):
        llm.chat([{"role": "user", "content": "\udfff"}], GREEDY, use_tqdm=False)
    tiny = make_llm(model, tokenizer, kv_cache_memory=2 * kv_block_bytes(model, 16))
    with pytest.raises(ValueError, match="can never fit"):
        tiny.generate("hi", SamplingParams(max_tokens=100), use_tqdm=False)
    assert_all_blocks_free(llm)


@pytest.mark.gpu
def test_cuda_graph_decode_matches_eager_decode_on_the_tiny_model(model, tokenizer):
    cuda_model = copy.deepcopy(model).cuda()
    params = SamplingParams(temperature=0, max_tokens=20)
    prompts = PROMPTS + [p[:7] for p in PROMPTS]
    graphs = make_llm(cuda_model, tokenizer, max_num_seqs=32)
    eager = make_llm(cuda_model, tokenizer, max_num_seqs=32, enforce_eager=True)
    with_graphs = graphs.generate(prompts, params, use_tqdm=False)
    assert graphs.engine.runner.graphs and not eager.engine.runner.graphs
    without = eager.generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in with_graphs] == \
        [o.outputs[0].token_ids for o in without]
    assert_all_blocks_free(graphs)


def test_a_stream_finished_by_another_call_still_yields_all_its_text(model, tokenizer):
    llm = make_llm(model, tokenizer)
    params = SamplingParams(temperature=0, max_tokens=10)
    it = llm.stream(PROMPTS[0], params)
    first = next(it)
    other = llm.generate(PROMPTS[1], SamplingParams(temperature=0, max_tokens=30),
                         use_tqdm=False)
    rest = "".join(it)
    assert other[0].outputs[0].finish_reason == "length"
    assert first + rest == llm.generate(PROMPTS[0], params, use_tqdm=False)[0].outputs[0].text
    assert_all_blocks_free(llm)


def test_generation_stops_at_the_model_context(model, tokenizer):
    llm = make_llm(model, tokenizer)
    ids = (tokenizer.encode(PROMPTS[8]) * 20)[:CONTEXT - 3]
    out = llm.generate(ids, SamplingParams(temperature=0, max_tokens=10), use_tqdm=False)[0]
    assert out.outputs[0].finish_reason == "length" and len(out.outputs[0].token_ids) == 3
    full = llm.generate((ids * 2)[:CONTEXT], GREEDY, use_tqdm=False)[0].outputs[0]
    assert full.finish_reason == "length" and len(full.token_ids) == 1
    assert_all_blocks_free(llm)


def test_abort_frees_the_requests_kv_blocks_at_once(model, tokenizer):
    llm = make_llm(model, tokenizer)
    engine, bm = llm.engine, llm.engine.block_manager
    params = SamplingParams(temperature=0, max_tokens=40)
    kept = engine.add_request(None, tokenizer.encode(PROMPTS[0]), params)
    gone = engine.add_request(None, tokenizer.encode(PROMPTS[2]), SamplingParams(n=3, max_tokens=40))
    for _ in range(3):
        engine.step()
    assert len(gone.seqs) == 3 and all(s.seq_id in bm for s in gone.seqs)
    free_before = bm.num_free_blocks
    engine.abort(gone.request_id)  # no step in between
    assert not any(s.seq_id in bm for s in gone.seqs) and kept.seqs[0].seq_id in bm
    assert bm.num_free_blocks > free_before and len(engine.scheduler) == 1
    assert [c.finish_reason for c in gone.to_output().outputs] == ["abort"] * 3
    engine.abort(kept.request_id)
    assert_all_blocks_free(llm)


def test_abort_of_a_waiting_request_never_admits_it(model, tokenizer):
    llm = make_llm(model, tokenizer)
    request = llm.engine.add_request(None, [1, 2, 3], GREEDY)
    llm.engine.abort(request.request_id)
    assert llm.engine.step() == [] and request.finished
    assert request.to_output().outputs[0].finish_reason == "abort"
    assert_all_blocks_free(llm)


def test_kv_cache_holds_max_num_seqs_sequences_of_max_model_len(model, tokenizer):
    llm = make_llm(model, tokenizer, kv_cache_memory=None, max_num_seqs=3, max_model_len=100)
    assert llm.engine.block_manager.num_blocks == 3 * 7  # ceil(100 / 16) blocks per sequence
    assert llm.engine.max_model_len == 100
    out = llm.generate([1] * 98, SamplingParams(temperature=0, max_tokens=10), use_tqdm=False)
    assert out[0].outputs[0].finish_reason == "length" and len(out[0].outputs[0].token_ids) == 2
    with pytest.raises(ValueError, match="longer than the model's context of 100"):
        llm.generate([1] * 101, GREEDY, use_tqdm=False)


def test_kv_cache_is_capped_by_the_available_memory(model, tokenizer, monkeypatch):
    per_block = kv_block_bytes(model, 16)
    fraction = engine_module.CPU_KV_MEMORY_FRACTION
    monkeypatch.setattr(engine_module, "_available_cpu_bytes", lambda: int(5.5 * per_block / fraction))
    assert make_llm(model, tokenizer, kv_cache_memory=None).engine.block_manager.num_blocks == 5
    explicit = make_llm(model, tokenizer, kv_cache_memory=9 * per_block)
    assert explicit.engine.block_manager.num_blocks == 9
    monkeypatch.setattr(engine_module, "_available_cpu_bytes", lambda: per_block)
    with pytest.raises(ValueError, match="holds no KV block.*set kv_cache_memory"):
        make_llm(model, tokenizer, kv_cache_memory=None)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(max_num_seqs=0), ValueError, "max_num_seqs must be a positive int"),
    (dict(block_size=2.5), ValueError, "block_size must be a positive int"),
    (dict(max_model_len=-1), ValueError, "max_model_len must be a positive int"),
    (dict(kv_cache_memory=True), ValueError, "kv_cache_memory must be a positive int"),
    (dict(max_num_seqs=16, max_num_batched_tokens=8), ValueError, "max_num_batched_tokens"),
    (dict(gpu_memory_utilization=1.5), ValueError, "gpu_memory_utilization"),
    (dict(seed=-1), ValueError, "seed"),
    (dict(enforce_eager="yes"), TypeError, "enforce_eager must be a bool"),
    (dict(dtype="int8"), ValueError, "dtype must be one of"),
    (dict(device="tpu"), ValueError, "device must be"),
    (dict(max_num_seq=4), TypeError, "unknown engine argument.*max_num_seqs"),
])
def test_engine_config_names_the_bad_field(kwargs, error, match):
    with pytest.raises(error, match=match):
        EngineConfig().with_overrides(**kwargs)


def test_engine_config_is_shared_and_checked_against_the_model(model, tokenizer):
    config = EngineConfig(max_num_seqs=4, kv_cache_memory=1 << 22, dtype="fp32")
    assert config.dtype == torch.float32
    llm = LLM.from_modules(model, tokenizer, config, seed=7)
    assert llm.engine.config == config.with_overrides(seed=7)
    assert llm.engine.scheduler.max_num_seqs == 4
    with pytest.raises(ValueError, match="max_model_len = 1000 exceeds the model's context"):
        LLM.from_modules(model, tokenizer, config, max_model_len=1000)
    with pytest.raises(ValueError, match="dtype"):
        LLM.from_modules(model, tokenizer, config, dtype=torch.float16)
