"""Scaled rotary tables against HF transformers' rotary embeddings, one per rope type."""

from __future__ import annotations

import pytest
import torch

from llm_engine.config import ModelConfig
from llm_engine.rope import check_rope_scaling, rope_cos_sin

transformers = pytest.importorskip("transformers")

HEAD_DIM, THETA, MAX_POS = 32, 10000.0, 256
SCALINGS = {
    "linear": {"rope_type": "linear", "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
    "yarn-mscale": {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 32,
                    "beta_fast": 16, "beta_slow": 2, "mscale": 1.0, "mscale_all_dim": 0.5},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
}


def hf_cos_sin(rotary_cls, config, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """HF's ``(cos, sin)`` first halves at ``positions`` (one sequence)."""
    rotary = rotary_cls(config)
    x = torch.zeros(1, positions.numel(), HEAD_DIM)
    cos, sin = rotary(x, positions[None])
    return cos[0, :, : HEAD_DIM // 2], sin[0, :, : HEAD_DIM // 2]


@pytest.mark.parametrize("name", list(SCALINGS))
def test_scaled_tables_match_transformers(name: str) -> None:
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    scaling = SCALINGS[name]
    config = transformers.LlamaConfig(hidden_size=HEAD_DIM * 2, num_attention_heads=2,
                                      max_position_embeddings=MAX_POS,
                                      rope_parameters={"rope_theta": THETA, **scaling})
    positions = torch.arange(MAX_POS)
    ref_cos, ref_sin = hf_cos_sin(LlamaRotaryEmbedding, config, positions)
    cos, sin = rope_cos_sin(HEAD_DIM, MAX_POS, THETA, scaling)
    torch.testing.assert_close(cos, ref_cos, rtol=0, atol=2e-5)
    torch.testing.assert_close(sin, ref_sin, rtol=0, atol=2e-5)
    if name != "dynamic":  # dynamic NTK equals plain RoPE within max_position_embeddings
        plain_cos, _ = rope_cos_sin(HEAD_DIM, MAX_POS, THETA)
        assert not torch.allclose(cos, plain_cos, atol=1e-3)


def test_longrope_uses_short_factors_before_and_long_factors_past_the_original_length() -> None:
    from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding

    original = 64
    gen = torch.Generator().manual_seed(0)
    short = (1 + torch.rand(HEAD_DIM // 2, generator=gen)).tolist()
    long = (1 + 4 * torch.rand(HEAD_DIM // 2, generator=gen)).tolist()
    scaling = {"rope_type": "longrope", "short_factor": short, "long_factor": long,
               "original_max_position_embeddings": original}
    config = transformers.Phi3Config(hidden_size=HEAD_DIM * 2, num_attention_heads=2,
                                     num_key_value_heads=2, max_position_embeddings=MAX_POS,
                                     original_max_position_embeddings=original, pad_token_id=0,
                                     rope_parameters={"rope_theta": THETA, **scaling})
    cos, sin = rope_cos_sin(HEAD_DIM, MAX_POS, THETA, scaling)
    # HF picks the factors by the sequence's length: short within the original length...
    ref_cos, ref_sin = hf_cos_sin(Phi3RotaryEmbedding, config, torch.arange(original))
    torch.testing.assert_close(cos[:original], ref_cos, rtol=0, atol=2e-5)
    torch.testing.assert_close(sin[:original], ref_sin, rtol=0, atol=2e-5)
    # ... long past it (HF then uses them at every position; we keep short ones below).
    ref_cos, ref_sin = hf_cos_sin(Phi3RotaryEmbedding, config, torch.arange(MAX_POS))
    torch.testing.assert_close(cos[original:], ref_cos[original:], rtol=0, atol=2e-5)
    torch.testing.assert_close(sin[original:], ref_sin[original:], rtol=0, atol=2e-5)


def test_bad_rope_scaling_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="rope_type"):
        check_rope_scaling({"rope_type": "ntk-by-parts"}, 32)
    with pytest.raises(ValueError, match="needs \\['factor'\\]"):
        check_rope_scaling({"rope_type": "linear"}, 32)
    with pytest.raises(ValueError, match="short_factor"):
        ModelConfig(hidden_size=64, num_heads=2, rope_scaling={
            "rope_type": "longrope", "short_factor": [1.0], "long_factor": [1.0] * 16,
            "original_max_position_embeddings": 64})
