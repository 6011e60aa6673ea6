"""Run a preference method end to end: ``align(AlignConfig)`` (``llm-engine train --method``).

It loads the model to start from (SmolLM2 by default), the preference data or prompts
(``"demo"``: the shipped demo set), the reward and the held-out prompts, builds the
method's trainer, resumes from the latest checkpoint when asked, and runs the trainer's
loop. Alignment runs in one process.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import torch

from llm_engine.training import preferences as pref
from llm_engine.training.alignment import AlignConfig, freeze_bottom, resolve_demo
from llm_engine.training.presets import get_preset
from llm_engine.training.reward_model import load_reward
from llm_engine.training.trainer import init_distributed


def align(cfg: AlignConfig) -> dict[str, Any]:
    """Train ``cfg.method`` as ``cfg`` says; returns the trainer's summary plus the output
    directory."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("the preference methods (rm, dpo, grpo) run in one process")
    _, device = init_distributed(cfg.device)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg.data = resolve_demo(cfg.data, "preferences", cfg.out_dir)
    cfg.prompts = resolve_demo(cfg.prompts, "prompts_train", cfg.out_dir)
    cfg.val_prompts = resolve_demo(cfg.val_prompts, "prompts_val", cfg.out_dir)
    if cfg.method in ("rm", "dpo") and (cfg.data is None or not Path(cfg.data).is_file()):
        raise ValueError(f"--method {cfg.method} needs --data: a preference JSONL file or "
                         f"'demo', got {cfg.data!r}")
    init_from = cfg.init_from or get_preset(cfg.preset).init_from
    if init_from is None:
        raise ValueError("preference training starts from a model: pass --init-from")
    from llm_engine.loader import load_model

    torch.manual_seed(cfg.seed)
    model, tokenizer = load_model(init_from, device=device, dtype=torch.float32,
                                  quantization="none")
    freeze_bottom(model, cfg.train_layers)
    if not (out / "tokenizer" / "tokenizer.json").is_file():
        tokenizer.save(out / "tokenizer")
    eval_prompts = pref.read_prompts(cfg.val_prompts) if cfg.val_prompts else None
    if cfg.method == "rm":
        from llm_engine.training.reward_model import build_reward_trainer

        trainer = build_reward_trainer(cfg, model, tokenizer, device)
    else:
        reward_fn = load_reward(cfg.reward, device) if cfg.reward else None
        if cfg.method == "dpo":
            from llm_engine.training.dpo import build_dpo_trainer

            trainer = build_dpo_trainer(cfg, model, tokenizer, device, eval_prompts, reward_fn)
        else:
            if reward_fn is None:
                raise ValueError("GRPO needs --reward rm:CHECKPOINT_DIR or "
                                 "python:module:function")
            from llm_engine.training.grpo import build_grpo_trainer

            trainer = build_grpo_trainer(cfg, model, tokenizer, reward_fn, device, eval_prompts)
    if cfg.resume and not trainer.resume():
        print(f"no checkpoint under {out}; starting from scratch", file=sys.stderr)
    return {**trainer.fit(), "out_dir": str(out)}
