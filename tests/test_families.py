"""Model families against HF transformers: random-weight models made from small configs,
saved with ``save_pretrained`` (and written as GGUF with the ``gguf`` package), loaded
through ``LLM``; logits and 32 greedy tokens must match HF's in fp32."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from llm_engine import LLM, SamplingParams
from llm_engine.model import AttentionMetadata

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_cpu_thread")

VOCAB = 300
PROMPT = "hello world, the quick fox jumps over"
COMMON = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=96,
              pad_token_id=0, bos_token_id=None, eos_token_id=None)

# family -> (config class, model class, extra config fields)
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=True)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=None)),
    "mistral-window": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=7)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True)),
    "qwen2-window": ("Qwen2Config", "Qwen2ForCausalLM",
                     dict(use_sliding_window=True, sliding_window=6, max_window_layers=1)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=16, tie_word_embeddings=False)),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(num_key_value_heads=6)),
    # Scaled RoPE end to end (the sequences stay below Phi-3's original length, where HF
    # and we both use the short factors).
    "llama-rope-llama3": ("LlamaConfig", "LlamaForCausalLM", dict(rope_parameters={
        "rope_type": "llama3", "rope_theta": 500.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 16})),
    "phi3-longrope": ("Phi3Config", "Phi3ForCausalLM", dict(
        num_key_value_heads=6, original_max_position_embeddings=48, rope_parameters={
            "rope_type": "longrope", "rope_theta": 10000.0,
            "short_factor": [1.0 + 0.25 * i for i in range(4)],
            "long_factor": [2.0 + i for i in range(4)]})),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM",
                dict(num_local_experts=5, num_experts_per_tok=2)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  dict(num_experts=5, num_experts_per_tok=2, moe_intermediate_size=40,
                       norm_topk_prob=False)),
}


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A small byte-level BPE tokenizer (vocab 300) with no EOS, so greedy runs go on."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator(["hello world, the quick brown fox jumps over the lazy dog"] * 20,
                           trainer)
    out = tmp_path_factory.mktemp("tok")
    hf.save(str(out / "tokenizer.json"))
    with open(out / "tokenizer_config.json", "w") as f:
        json.dump({}, f)
    return str(out)


def hf_model(family: str, seed: int = 0):
    """A random HF model of ``family`` with N(0, 0.15) matrices (peaked logits)."""
    config_cls, model_cls, extra = FAMILIES[family]
    config = getattr(transformers, config_cls)(**{**COMMON, **extra})
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * (0.15 if p.dim() >= 2 else 0.1) + (p.dim() == 1))
    return model


def save_hf_dir(model, tokenizer_dir: str, out: str, **save_kwargs) -> str:
    model.save_pretrained(out, **save_kwargs)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        with open(os.path.join(tokenizer_dir, name)) as src, open(os.path.join(out, name), "w") as dst:
            dst.write(src.read())
    return out


def our_logits(llm: LLM, ids: list[int]) -> torch.Tensor:
    model = llm.model
    with torch.no_grad():
        return model.compute_logits(model(torch.tensor(ids), torch.arange(len(ids)),
                                          AttentionMetadata.for_lengths([len(ids)], "cpu")))


def check_against_hf(llm: LLM, hf, ids: list[int]) -> None:
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    ours = our_logits(llm, ids)
    rel = ((ours - ref).norm() / ref.norm()).item()
    assert rel < 1e-4, f"logits differ from HF's: relative error {rel:.2e}"
    greedy = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    out = llm.generate([ids], greedy, use_tqdm=False)[0].outputs[0].token_ids
    with torch.no_grad():
        ref_ids = hf.generate(torch.tensor([ids]), max_new_tokens=32, min_new_tokens=32,
                              do_sample=False, pad_token_id=0)[0, len(ids):].tolist()
    assert out == ref_ids


@pytest.mark.parametrize("family", list(FAMILIES))
def test_hf_directory_matches_transformers(family, tokenizer_dir, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("LLM_ENGINE_CACHE", str(tmp_path / "cache"))
    hf = hf_model(family)
    # Sharded safetensors for one family (the index file is not needed to load).
    kwargs = {"max_shard_size": "100KB"} if family == "qwen3" else {}
    path = save_hf_dir(hf, tokenizer_dir, str(tmp_path / family), **kwargs)
    if family == "qwen3":
        assert len([f for f in os.listdir(path) if f.endswith(".safetensors")]) > 1
    # Small blocks on window models: an all-window model (Mistral) releases the blocks
    # that fall out of the window while it generates.
    llm = LLM(path, device="cpu", dtype=torch.float32, kv_cache_memory=1 << 22,
              block_size=4 if family.endswith("window") else 16)
    config = llm.model.config
    assert config.tie_word_embeddings == hf.config.tie_word_embeddings
    if family == "mistral-window":
        assert llm.engine.scheduler.kv_window == config.sliding_window
    if family.endswith("window"):
        assert config.sliding_window is not None
    ids = llm.tokenizer.encode(PROMPT)
    assert len(ids) + 32 > (config.sliding_window or 0) * 2  # the window is crossed
    check_against_hf(llm, hf, ids)


# ---------------------------------------------------------------------------- GGUF
GGUF_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3",
             "qwen3_moe": "qwen3moe", "mixtral": "llama", "phi3": "phi3"}


def _permute_rope_rows(w: torch.Tensor, heads: int) -> torch.Tensor:
    """HF (halves) -> llama.cpp (interleaved pairs) row order, as its converter does."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def write_gguf(hf, family: str, tokenizer_dir: str, path: str) -> None:
    """``hf``'s weights and the test tokenizer as a GGUF file, named as llama.cpp names them."""
    import gguf

    arch = GGUF_ARCH[family]
    c = hf.config
    w = gguf.GGUFWriter(path, arch)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    moe = family in ("mixtral", "qwen3_moe")
    if moe:
        w.add_expert_count(c.num_local_experts if family == "mixtral" else c.num_experts)
        w.add_expert_used_count(c.num_experts_per_tok)
        if family == "qwen3_moe":
            w.add_expert_feed_forward_length(c.moe_intermediate_size)
            w.add_expert_weights_norm(c.norm_topk_prob)
    with open(os.path.join(tokenizer_dir, "tokenizer.json")) as f:
        tok = json.load(f)
    vocab = sorted(tok["model"]["vocab"].items(), key=lambda kv: kv[1])
    vocab += [(f"<unused{i}>", i) for i in range(len(vocab), c.vocab_size)]  # as many as rows
    w.add_tokenizer_model("gpt2")
    w.add_token_list([t for t, _ in vocab])
    w.add_token_types([3 if t.startswith("<") else 1 for t, _ in vocab])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]])

    sd = {k: v.detach().float() for k, v in hf.state_dict().items()}
    layer_names = {
        "input_layernorm.weight": "attn_norm.weight",
        "post_attention_layernorm.weight": "ffn_norm.weight",
        "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
        "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
        "self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias",
        "self_attn.v_proj.bias": "attn_v.bias",
        "self_attn.q_norm.weight": "attn_q_norm.weight",
        "self_attn.k_norm.weight": "attn_k_norm.weight",
        "self_attn.qkv_proj.weight": "attn_qkv.weight",
        "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
        "mlp.down_proj.weight": "ffn_down.weight", "mlp.gate_up_proj.weight": "ffn_up.weight",
        "mlp.gate.weight": "ffn_gate_inp.weight",
        "mlp.experts.gate_up_proj": None, "mlp.experts.down_proj": "ffn_down_exps.weight",
    }
    out: dict[str, torch.Tensor] = {"token_embd.weight": sd["model.embed_tokens.weight"],
                                    "output_norm.weight": sd["model.norm.weight"]}
    if not c.tie_word_embeddings:
        out["output.weight"] = sd["lm_head.weight"]
    for name, t in sd.items():
        if not name.startswith("model.layers."):
            continue
        i, rest = name.split(".")[2], ".".join(name.split(".")[3:])
        if rest == "mlp.experts.gate_up_proj":  # (E, 2·width, hidden): [gate | up]
            gate, up = t.chunk(2, dim=1)
            out[f"blk.{i}.ffn_gate_exps.weight"], out[f"blk.{i}.ffn_up_exps.weight"] = gate, up
            continue
        target = layer_names[rest]
        if arch == "llama" and target == "attn_q.weight":
            t = _permute_rope_rows(t, c.num_attention_heads)
        elif arch == "llama" and target == "attn_k.weight":
            t = _permute_rope_rows(t, c.num_key_value_heads)
        out[f"blk.{i}.{target}"] = t
    for name, t in out.items():
        w.add_tensor(name, np.ascontiguousarray(t.numpy()))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3", "phi3", "mixtral",
                                    "qwen3_moe"])
def test_gguf_file_matches_transformers(family, tokenizer_dir, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("LLM_ENGINE_CACHE", str(tmp_path / "cache"))
    hf = hf_model(family, seed=1)
    path = str(tmp_path / f"{family}.gguf")
    write_gguf(hf, family, tokenizer_dir, path)
    llm = LLM(path, device="cpu", dtype=torch.float32, kv_cache_memory=1 << 22)
    ids = llm.tokenizer.encode(PROMPT)
    check_against_hf(llm, hf, ids)


def test_unsupported_model_type_lists_the_supported_ones(tokenizer_dir, tmp_path,
                                                         monkeypatch) -> None:
    monkeypatch.setenv("LLM_ENGINE_CACHE", str(tmp_path / "cache"))
    path = save_hf_dir(hf_model("llama"), tokenizer_dir, str(tmp_path / "m"))
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    config["model_type"] = "mamba"
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    with pytest.raises(ValueError, match="'mamba' is not supported.*'mistral'.*'phi3'.*'qwen3_moe'"):
        LLM(path, device="cpu")
