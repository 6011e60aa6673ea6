"""Parity with the reference implementation (HF transformers) on the real SmolLM2 weights.

Both sides load the same GGUF file; the model runs in fp32 on CPU.
"""

from __future__ import annotations

import os

import pytest
import torch

from llm_engine.loader import _known_model_file, load_model
from llm_engine.model import AttentionMetadata

pytestmark = pytest.mark.slow

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "Once upon a time, in a small village by the sea,",
    "<|im_start|>user\nWhat is 17 * 23?<|im_end|>\n<|im_start|>assistant\n",
]

TOKENIZER_SAMPLES = [
    "Hello, world!",
    "  leading spaces and trailing   ",
    "tabs\tand\nnewlines\n\n\nand\r\nCRLF",
    "numbers 1234567890 and 3.14159, 1e-9, 0x1F",
    "unicode: café naïve résumé — “quotes” … 日本語のテキスト 中文 한국어 Ελληνικά русский",
    "emoji 🚀🔥👍🏽 and combining é (e + \u0301) and zero\u200bwidth",
    "code: for (int i = 0; i < n; ++i) { sum += a[i] * b[i]; }\n\tif x != y:\n\t\treturn None",
    "special tokens <|im_start|>user\nhi<|im_end|> inline <|endoftext|>",
    "\u00a0non-breaking\u00a0spaces and     runs      of        whitespace",
    "",
]


@pytest.fixture(scope="module")
def gguf_path() -> str:
    try:
        return _known_model_file("smollm2")
    except FileNotFoundError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def hf_model(gguf_path: str):
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(gguf_path), gguf_file=os.path.basename(gguf_path), dtype=torch.float32)
    # Generate through EOS, like ignore_eos=True on our side (min_new_tokens would
    # instead forbid EOS, changing the argmax).
    model.generation_config.eos_token_id = None
    return model.eval()


@pytest.fixture(scope="module")
def hf_tokenizer(gguf_path: str):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(os.path.dirname(gguf_path),
                                                      gguf_file=os.path.basename(gguf_path))


@pytest.fixture(scope="module")
def ours():
    return load_model("smollm2", device="cpu", dtype=torch.float32, quantization="none")


def test_logits_match_hf_on_several_prompts(ours, hf_model) -> None:
    model, tok = ours
    ids = [tok.encode(p) for p in PROMPTS]
    lengths = [len(i) for i in ids]
    with torch.no_grad():
        hidden = model(torch.tensor(sum(ids, [])), torch.cat([torch.arange(n) for n in lengths]),
                       AttentionMetadata.for_lengths(lengths, "cpu"))
        logits = model.compute_logits(hidden).split(lengths)
        for prompt_ids, got in zip(ids, logits, strict=True):
            ref = hf_model(torch.tensor([prompt_ids])).logits[0]
            max_rel = ((got - ref).abs().max() / ref.abs().max()).item()
            assert max_rel < 1e-4, f"max relative error {max_rel:.2e}"


def test_greedy_generation_of_32_tokens_matches_hf(ours, hf_model) -> None:
    from llm_engine import LLM, SamplingParams

    model, tok = ours
    llm = LLM.from_modules(model, tok, max_num_seqs=len(PROMPTS), max_model_len=256)
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    prompt_ids = [tok.encode(p) for p in PROMPTS]
    outputs = llm.generate(prompt_ids, params, use_tqdm=False)
    for ids, out in zip(prompt_ids, outputs, strict=True):
        ref = hf_model.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False,
                                pad_token_id=tok.eos_token_id)[0, len(ids):].tolist()
        assert out.outputs[0].token_ids == ref


def test_tokenizer_encodes_and_decodes_like_hf(ours, hf_tokenizer) -> None:
    _, tok = ours
    for text in TOKENIZER_SAMPLES:
        ids = tok.encode(text)
        assert ids == hf_tokenizer.encode(text, add_special_tokens=False), text
        assert tok.decode(ids, skip_special_tokens=False) == hf_tokenizer.decode(ids), text
        assert tok.decode(ids, skip_special_tokens=False) == text


def test_chat_template_renders_like_hf(ours, hf_tokenizer) -> None:
    _, tok = ours
    conversation = [{"role": "user", "content": "Hi there"},
                    {"role": "assistant", "content": "Hello! How can I help?"},
                    {"role": "user", "content": "Tell me a joke."}]
    for messages in (conversation, [{"role": "system", "content": "Be brief."}, *conversation]):
        ours_text = tok.apply_chat_template(messages, add_generation_prompt=True)
        ref = hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert ours_text == ref
    assert tok.bos_token_id == 1 and tok.eos_token_id == 2
