"""The reward model: our ``Transformer`` with a scalar head read at the last token, trained
on preference pairs with the Bradley–Terry loss.

A reward-model checkpoint is a model checkpoint (``load_model`` reads its backbone) plus
``reward_head.safetensors``; :meth:`RewardModel.load` reads either a training checkpoint
(``<out>/checkpoints/step_N``) or the run's directory (its latest checkpoint).
"""

from __future__ import annotations

import importlib
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn

from llm_engine.model import Transformer
from llm_engine.tokenizer import Tokenizer
from llm_engine.training import data as data_lib
from llm_engine.training import preferences as pref
from llm_engine.training.alignment import AlignConfig, AlignTrainer, RewardFn
from llm_engine.training.checkpoint import latest_checkpoint
from llm_engine.training.losses import bradley_terry_loss

HEAD_FILE = "reward_head.safetensors"


class RewardModel(nn.Module):
    """``backbone`` (a ``Transformer``) and a linear ``head`` (hidden → 1) on the final
    hidden state of each sequence's last token."""

    def __init__(self, backbone: Transformer, tokenizer: Tokenizer | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.tokenizer = tokenizer
        hidden = backbone.config.hidden_size
        p = next(backbone.parameters())
        self.head = nn.Linear(hidden, 1, device=p.device, dtype=p.dtype)
        nn.init.normal_(self.head.weight, 0.0, 1.0 / math.sqrt(hidden))
        nn.init.zeros_(self.head.bias)

    @property
    def config(self):
        return self.backbone.config

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, inputs: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        """Rewards ``(B,)`` fp32 of right-padded ``inputs (B, S)`` int64 read at ``last (B,)``
        (each row's last real token)."""
        B, S = inputs.shape
        hidden = self.backbone.forward_batch(inputs).view(B, S, -1)
        h = hidden[torch.arange(B, device=inputs.device), last.to(inputs.device)]
        return self.head(h).squeeze(-1).float()

    @torch.no_grad()
    def score(self, prompts: list[str | pref.Messages], responses: list[str],
              batch_size: int = 8) -> list[float]:
        """The reward of each ``(prompt, response)``: a prompt is a user message's text or a
        conversation; it is rendered with the chat template as in training."""
        if self.tokenizer is None:
            raise ValueError("this RewardModel has no tokenizer; build it with one to score text")
        if len(prompts) != len(responses):
            raise ValueError(f"prompts and responses must have the same length, got "
                             f"{len(prompts)} and {len(responses)}")
        if not prompts:
            return []
        tok = self.tokenizer
        conversations = [[{"role": "user", "content": p}] if isinstance(p, str) else p
                         for p in prompts]
        pad = tok.eos_token_id if tok.eos_token_id is not None else 0
        device = next(self.parameters()).device
        was_training = self.training
        self.eval()
        scores: list[float] = []
        try:
            for start in range(0, len(prompts), batch_size):
                chunk = slice(start, start + batch_size)
                batch = pref.build_sequences(
                    [pref.encode_prompt(tok, m) for m in conversations[chunk]],
                    [pref.encode_response(tok, r) if r else [pad] for r in responses[chunk]],
                    pad, self.config.max_position_embeddings - 1)
                scores += self(batch.inputs.to(device), batch.last.to(device)).tolist()
        finally:
            self.train(was_training)
        return scores

    def head_tensors(self) -> dict[str, torch.Tensor]:
        return {"weight": self.head.weight, "bias": self.head.bias}

    def load_head(self, path: str | os.PathLike) -> None:
        tensors = load_file(Path(path) / HEAD_FILE)
        with torch.no_grad():
            self.head.weight.copy_(tensors["weight"])
            self.head.bias.copy_(tensors["bias"])

    @classmethod
    def load(cls, path: str | os.PathLike, device: torch.device | str = "cpu",
             dtype: torch.dtype = torch.float32) -> RewardModel:
        """A reward model from a checkpoint directory or a run directory (its latest)."""
        from llm_engine.loader import load_model

        path = Path(path)
        if not (path / HEAD_FILE).is_file():
            latest = latest_checkpoint(path)
            if latest is None or not (latest / HEAD_FILE).is_file():
                raise ValueError(f"{path} is not a reward-model checkpoint (no {HEAD_FILE}, "
                                 f"no checkpoints/latest.json naming one)")
            path = latest
        backbone, tokenizer = load_model(str(path), device=device, dtype=dtype,
                                         quantization="none")
        model = cls(backbone, tokenizer)
        model.load_head(path)
        return model.eval()


class RewardTrainer(AlignTrainer):
    """Bradley–Terry training of a :class:`RewardModel` on :class:`~llm_engine.training.
    preferences.PairExamples`; evaluation is the held-out pair accuracy."""

    plot_keys = ("loss", "accuracy", "margin", "val_loss", "val_accuracy", "val_margin")

    def backbone(self) -> Transformer:
        return self.model.backbone

    def extra_tensors(self) -> dict[str, dict[str, torch.Tensor]]:
        return {HEAD_FILE: self.model.head_tensors()}

    def load_extra(self, path: Path) -> None:
        self.model.load_head(path)

    def _rewards(self, examples: pref.PairExamples, indices: np.ndarray
                 ) -> tuple[torch.Tensor, torch.Tensor, int]:
        chosen, rejected = examples.chosen.select(indices), examples.rejected.select(indices)
        rc = self.model(chosen.inputs.to(self.device), chosen.last)
        rr = self.model(rejected.inputs.to(self.device), rejected.last)
        return rc, rr, chosen.inputs.numel() + rejected.inputs.numel()

    def train_step(self) -> dict[str, float]:
        cfg = self.cfg
        t0 = time.perf_counter()
        indices = data_lib.global_batch_indices(cfg.seed, self.step, self.global_batch,
                                                self.train_data.num_choices)
        totals = torch.zeros(3)
        tokens = 0
        for micro in range(cfg.grad_accum):
            mine = data_lib.micro_batch_indices(indices, micro, cfg.grad_accum, 0, 1)
            rc, rr, n = self._rewards(self.train_data, mine)
            loss, acc, margin = bradley_terry_loss(rc, rr)
            (loss / cfg.grad_accum).backward()
            totals += torch.stack([loss.detach(), acc, margin.detach()]).cpu() / cfg.grad_accum
            tokens += n
        return self._finish_step(totals, tokens, t0)

    @torch.no_grad()
    def evaluate(self) -> dict[str, Any]:
        """Held-out Bradley–Terry loss, pair accuracy and mean margin (``eval_examples``
        pairs at most)."""
        indices = data_lib.eval_indices(self.val_data.num_choices, self.cfg.eval_examples)
        self.model.eval()
        rcs, rrs = [], []
        try:
            for start in range(0, len(indices), self.cfg.batch_size):
                rc, rr, _ = self._rewards(self.val_data, indices[start:start + self.cfg.batch_size])
                rcs.append(rc)
                rrs.append(rr)
        finally:
            self.model.train()
        loss, acc, margin = bradley_terry_loss(torch.cat(rcs), torch.cat(rrs))
        return {"step": self.step, "val_loss": loss.item(), "val_accuracy": acc.item(),
                "val_margin": margin.item(), "val_pairs": len(indices)}


def build_reward_trainer(cfg: AlignConfig, backbone: Transformer, tokenizer: Tokenizer,
                         device: torch.device | str = "cpu") -> RewardTrainer:
    """A :class:`RewardTrainer` for ``cfg.data`` (preference JSONL), the prompts in its last
    ``val_fraction`` held out."""
    pairs = pref.read_preferences(cfg.data)
    train, val = pref.split_pairs(pairs, cfg.val_fraction)
    model = RewardModel(backbone, tokenizer)
    return RewardTrainer(cfg, model, tokenizer,
                         pref.build_pair_examples(train, tokenizer, cfg.max_len),
                         pref.build_pair_examples(val, tokenizer, cfg.max_len), device=device)


def load_reward(spec: str, device: torch.device | str = "cpu") -> RewardFn:
    """The reward ``function(prompts, responses) -> list[float]`` that ``spec`` names:
    ``python:module:function`` (imported) or ``rm:CHECKPOINT_DIR`` (a trained reward
    model, scoring in batches)."""
    kind, _, rest = spec.partition(":")
    if kind == "python":
        module, _, name = rest.rpartition(":")
        if not module or not name:
            raise ValueError(f"reward {spec!r}: expected python:module:function")
        try:
            fn = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"reward {spec!r}: cannot import {module}:{name}: {e}") from None
        if not callable(fn):
            raise ValueError(f"reward {spec!r}: {module}:{name} is not callable")
        return fn
    if kind == "rm" and rest:
        model = RewardModel.load(rest, device=device)
        return model.score
    raise ValueError(f"reward must be rm:CHECKPOINT_DIR or python:module:function, got {spec!r}")
