"""Named training setups: a model shape (or a model to fine-tune) plus default hyperparameters.

- ``tiny``: a ~4M-parameter Llama-style model with a 4096-token BPE trained on the data;
  trains on a laptop CPU in minutes (default data: the Python standard library).
- ``gpt2-124m``: GPT-2 small (12 layers, 768 wide, learned positions, tied embeddings)
  with the default model's 49152-token tokenizer; a GPU preset.
- ``smollm2-sft``: supervised fine-tuning of SmolLM2-135M-Instruct on chat JSONL.
- ``smollm2-rm``, ``smollm2-dpo``, ``smollm2-grpo``: preference training of SmolLM2-135M
  (reward model, DPO, GRPO with engine rollouts) sized for a 2-core CPU in minutes, on
  the demo preference set (:mod:`llm_engine.training.demo_data`) unless told otherwise.

Every default can be overridden from the command line or ``TrainConfig``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from llm_engine.config import ModelConfig


@dataclass(frozen=True)
class Preset:
    """``model`` is the shape to train from scratch (its ``vocab_size`` is replaced by the
    tokenizer's, rounded up to a multiple of 64); ``init_from`` names a model to fine-tune
    instead. ``tokenizer`` is ``"train"`` (a new BPE of ``TrainConfig.vocab_size`` tokens),
    ``"smollm2"``, or a directory. ``defaults`` are ``TrainConfig`` field values.
    ``chat_data``: the preset trains on chat JSONL only (supervised fine-tuning)."""

    name: str
    description: str
    model: ModelConfig | None
    init_from: str | None
    tokenizer: str
    defaults: dict[str, Any] = field(default_factory=dict)
    chat_data: bool = False
    method: str | None = None  # rm, dpo, grpo: a preference method (AlignConfig fields)


PRESETS: dict[str, Preset] = {
    "tiny": Preset(
        name="tiny",
        description="~4M-parameter Llama-style model, 4096-token BPE; CPU-friendly",
        model=ModelConfig(arch="llama", vocab_size=4096, hidden_size=256, num_layers=4,
                          num_heads=4, num_kv_heads=2, intermediate_size=704,
                          max_position_embeddings=1024, tie_word_embeddings=True),
        init_from=None,
        tokenizer="train",
        defaults=dict(data="stdlib", vocab_size=4096, seq_len=128, batch_size=16, steps=300,
                      lr=2e-3, warmup_steps=30, weight_decay=0.1, eval_every=50,
                      ckpt_every=100, eval_examples=64),
    ),
    "gpt2-124m": Preset(
        name="gpt2-124m",
        description="GPT-2 small (124M) with the SmolLM2 tokenizer; for a GPU",
        model=ModelConfig(arch="gpt2", vocab_size=49152, hidden_size=768, num_layers=12,
                          num_heads=12, intermediate_size=3072, max_position_embeddings=1024,
                          norm_eps=1e-5, tie_word_embeddings=True),
        init_from=None,
        tokenizer="smollm2",
        defaults=dict(data="stdlib", seq_len=1024, batch_size=16, steps=5000, lr=6e-4,
                      warmup_steps=200, weight_decay=0.1, eval_every=250, ckpt_every=1000,
                      eval_examples=128),
    ),
    "smollm2-sft": Preset(
        name="smollm2-sft",
        description="supervised fine-tuning of SmolLM2-135M-Instruct on chat JSONL",
        model=None,
        init_from="smollm2",
        tokenizer="smollm2",
        defaults=dict(seq_len=512, batch_size=4, steps=200, lr=5e-5, warmup_steps=10,
                      weight_decay=0.0, eval_every=50, ckpt_every=100, eval_examples=32),
        chat_data=True,
    ),
    "smollm2-rm": Preset(
        name="smollm2-rm",
        description="reward model from SmolLM2-135M-Instruct on preference pairs; CPU minutes",
        model=None,
        init_from="smollm2",
        tokenizer="smollm2",
        defaults=dict(method="rm", data="demo", max_len=96, batch_size=8, steps=12, lr=1e-4,
                      warmup_steps=2, weight_decay=0.0, eval_every=0, ckpt_every=0,
                      eval_examples=24, log_every=1, val_fraction=0.25, train_layers=2),
        method="rm",
    ),
    "smollm2-dpo": Preset(
        name="smollm2-dpo",
        description="DPO of SmolLM2-135M-Instruct on preference pairs; CPU minutes",
        model=None,
        init_from="smollm2",
        tokenizer="smollm2",
        defaults=dict(method="dpo", data="demo", max_len=96, batch_size=4, steps=10, lr=2e-5,
                      warmup_steps=2, weight_decay=0.0, eval_every=0, ckpt_every=0,
                      eval_examples=16, log_every=1, val_fraction=0.25, beta=0.1,
                      val_prompts="demo", train_layers=4, eval_max_tokens=40,
                      reward="python:llm_engine.training.demo_data:one_sentence_reward"),
        method="dpo",
    ),
    "smollm2-grpo": Preset(
        name="smollm2-grpo",
        description="GRPO of SmolLM2-135M-Instruct with engine rollouts; CPU minutes",
        model=None,
        init_from="smollm2",
        tokenizer="smollm2",
        defaults=dict(method="grpo", prompts="demo", val_prompts="demo", batch_size=2,
                      group_size=4, max_new_tokens=24, steps=10, lr=2e-5, warmup_steps=1,
                      weight_decay=0.0, eval_every=0, ckpt_every=0, eval_examples=16,
                      log_every=1, kl_coef=0.04, clip_eps=0.2, train_layers=4,
                      eval_max_tokens=40,
                      reward="python:llm_engine.training.demo_data:one_sentence_reward"),
        method="grpo",
    ),
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    return PRESETS[name]
