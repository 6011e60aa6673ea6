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


def _smollm2(name: str, description: str, *, chat_data: bool = False,
             method: str | None = None, **defaults: Any) -> Preset:
    """A preset that fine-tunes SmolLM2-135M-Instruct with its own tokenizer; a
    preference ``method`` is also its default ``method`` field."""
    if method is not None:
        defaults = dict(method=method, **defaults)
    return Preset(name=name, description=description, model=None, init_from="smollm2",
                  tokenizer="smollm2", defaults=defaults, chat_data=chat_data, method=method)


# What the preference presets share: sized for a 2-core CPU in minutes, evaluated and
# checkpointed only at the end, logged every step, on the demo preference set.
_CPU_MINUTES = dict(warmup_steps=2, weight_decay=0.0, eval_every=0, ckpt_every=0,
                    log_every=1)
_DEMO_PAIRS = dict(data="demo", max_len=96, val_fraction=0.25)
_DEMO_ANSWERS = dict(val_prompts="demo", train_layers=4, eval_max_tokens=40,
                     reward="python:llm_engine.training.demo_data:one_sentence_reward")

PRESETS: dict[str, Preset] = {p.name: p for p in (
    Preset(
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
    Preset(
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
    _smollm2("smollm2-sft", "supervised fine-tuning of SmolLM2-135M-Instruct on chat JSONL",
             chat_data=True, seq_len=512, batch_size=4, steps=200, lr=5e-5, warmup_steps=10,
             weight_decay=0.0, eval_every=50, ckpt_every=100, eval_examples=32),
    _smollm2("smollm2-rm",
             "reward model from SmolLM2-135M-Instruct on preference pairs; CPU minutes",
             method="rm", **_CPU_MINUTES, **_DEMO_PAIRS, batch_size=8, steps=12, lr=1e-4,
             eval_examples=24, train_layers=2),
    _smollm2("smollm2-dpo", "DPO of SmolLM2-135M-Instruct on preference pairs; CPU minutes",
             method="dpo", **_CPU_MINUTES, **_DEMO_PAIRS, **_DEMO_ANSWERS, batch_size=4,
             steps=10, lr=2e-5, eval_examples=16, beta=0.1),
    _smollm2("smollm2-grpo", "GRPO of SmolLM2-135M-Instruct with engine rollouts; CPU minutes",
             method="grpo", **{**_CPU_MINUTES, "warmup_steps": 1, "eval_every": 10},
             **_DEMO_ANSWERS, prompts="demo", batch_size=2, group_size=8, max_new_tokens=32,
             steps=30, lr=2e-4, eval_examples=8, kl_coef=0.04, clip_eps=0.2),
)}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    return PRESETS[name]
