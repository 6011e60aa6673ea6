"""The engine on the real SmolLM2-135M-Instruct (fp32 on CPU; bf16 + CUDA graphs on a GPU)."""

import random

import pytest
import torch
from testing_utils import require_default_model

from llm_engine import LLM, SamplingParams, ops
from llm_engine.model import AttentionMetadata

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_cpu_thread")]

SUBJECTS = ["The history of Rome", "A recipe for bread", "def quicksort(xs):", "Dear diary,",
            "The mitochondria is", "In 1969, astronauts", "Python lists vs tuples:",
            "Once upon a time"]
SYSTEM = "You are a concise assistant. Answer in one short sentence. "


def varied_prompts(n: int) -> list[str]:
    """Different lengths; a third share a long system prefix, some share shorter ones."""
    rng = random.Random(0)
    prompts = []
    for i in range(n):
        subject = SUBJECTS[i % len(SUBJECTS)]
        if i % 3 == 0:
            prompts.append(SYSTEM * (1 + i % 2) + subject)
        elif i % 3 == 1:
            prompts.append(subject + " and " + SUBJECTS[rng.randrange(len(SUBJECTS))].lower())
        else:
            prompts.append(" ".join([subject] * rng.randint(1, 6)))
    return prompts


@pytest.fixture(scope="module")
def llm() -> LLM:
    require_default_model()
    return LLM("smollm2", device="cpu", dtype=torch.float32, max_num_seqs=64,
               kv_cache_memory=1 << 30)


def test_batched_greedy_equals_each_prompt_alone(llm):
    """Batching invariance with fp32 activations: 64 varied prompts together give, token
    for token, what each gives alone (alone = one request in the engine, no prefix cache
    to hit). Decode steps round activations to int8 by default (as llama.cpp does), which
    can turn the ~1e-7 differences between a batch's routes into a different token at a
    near tie; ``quantized_linear=cpp`` keeps them fp32."""
    prompts = varied_prompts(64)
    params = SamplingParams(temperature=0, max_tokens=4)
    alone_llm = LLM.from_modules(llm.model, llm.tokenizer, enable_prefix_caching=False,
                                 kv_cache_memory=1 << 27)
    with ops.use(quantized_linear="cpp"):
        llm.generate(SYSTEM * 2 + "Hi", params, use_tqdm=False)  # leaves the prefix cached
        together = llm.generate(prompts, params, use_tqdm=False)
        assert sum(o.num_cached_tokens > 0 for o in together) >= 10
        for prompt, out in zip(prompts, together, strict=True):
            alone = alone_llm.generate(prompt, params, use_tqdm=False)[0]
            assert out.outputs[0].token_ids == alone.outputs[0].token_ids, prompt
    bm = llm.engine.block_manager
    assert len(bm) == 0 and bm.num_free_blocks == bm.num_blocks


def test_greedy_matches_the_model_without_a_cache(llm):
    prompt = "The three primary colours are"
    ids = llm.tokenizer.encode(prompt)
    out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=6), use_tqdm=False)[0]
    ref = list(ids)
    with torch.no_grad():
        for _ in range(6):
            h = llm.model(torch.tensor(ref), torch.arange(len(ref)),
                          AttentionMetadata.for_lengths([len(ref)], "cpu"))
            ref.append(int(llm.model.compute_logits(h[-1:]).argmax()))
    assert out.outputs[0].token_ids == ref[len(ids):]


def test_chat_answers_and_stops_at_eos(llm):
    out = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                   SamplingParams(temperature=0, max_tokens=16), use_tqdm=False)[0].outputs[0]
    assert "Paris" in out.text
    assert out.finish_reason == "stop" and out.token_ids[-1] == llm.tokenizer.eos_token_id
    streamed = "".join(llm.stream(
        llm.tokenizer.apply_chat_template([{"role": "user",
                                            "content": "What is the capital of France?"}]),
        SamplingParams(temperature=0, max_tokens=16)))
    assert streamed == out.text


@pytest.mark.gpu
def test_cuda_graph_decode_matches_eager_decode():
    require_default_model()
    params = SamplingParams(temperature=0, max_tokens=24)
    prompts = varied_prompts(20)
    graphs = LLM("smollm2", device="cuda", dtype=torch.bfloat16, max_num_seqs=32,
                 kv_cache_memory=1 << 30)
    eager = LLM.from_modules(graphs.model, graphs.tokenizer, max_num_seqs=32,
                             kv_cache_memory=1 << 30, enforce_eager=True)
    with_graphs = graphs.generate(prompts, params, use_tqdm=False)
    assert graphs.engine.runner.graphs  # decode steps replayed captured graphs
    without = eager.generate(prompts, params, use_tqdm=False)
    same = sum(a.outputs[0].token_ids == b.outputs[0].token_ids
               for a, b in zip(with_graphs, without, strict=True))
    # bf16: an occasional near-tie may flip; nearly all completions must agree exactly.
    assert same >= len(prompts) - 2


def test_the_cpu_engine_holds_the_gguf_blocks_in_rows8_as_cached(llm):
    """The conversion cache stores Q8_0 / Q4_0 / Q4_1 blocks in the rows8 layout the CPU
    kernels read, so loading needs no second copy; the state dict still gives GGUF's."""
    from llm_engine.loader import _load_converted, _resolve

    model = llm.model
    up, emb = model.layers[0].mlp.up_proj, model.embed_tokens
    assert [p.layout for p in up.parts] == ["rows8"] and emb.qweight.layout == "rows8"
    _, cached = _load_converted(f"{_resolve('smollm2')}/model.safetensors")
    assert {p.layout for parts in cached.values() for p in parts} == {"rows8"}
    rows = model.state_dict()["layers.0.mlp.up_proj.blocks0"]
    assert torch.equal(rows, up.parts[0].to_layout("rows").blocks)
