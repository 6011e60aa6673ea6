"""Direct preference optimisation (DPO, or IPO with ``ipo=True``) of a policy on pairs.

The reference policy is the policy as it starts. Its sequence log-probs are computed once
per example, when a batch first needs it, and cached: in fixed chunks of ``REF_CHUNK``
examples (so a value never depends on which batch first needed it, and a resumed run
gets the same bits), kept with
each checkpoint (``ref_logprobs.safetensors``); the reference model is dropped once every
example has its values.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from llm_engine.model import Transformer
from llm_engine.tokenizer import Tokenizer
from llm_engine.training import data as data_lib
from llm_engine.training import preferences as pref
from llm_engine.training.alignment import AlignConfig, AlignTrainer, RewardFn
from llm_engine.training.losses import dpo_loss, sequence_logprobs

REF_CHUNK = 1
REF_FILE = "ref_logprobs.safetensors"


def pair_logprobs(model: Transformer, examples: pref.PairExamples, indices: np.ndarray,
                  device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed answer log-probs ``(N,)`` of the chosen and the rejected rows ``indices``."""
    out = []
    for batch in (examples.chosen.select(indices), examples.rejected.select(indices)):
        logp, mask = sequence_logprobs(model, batch.inputs.to(device), batch.targets.to(device))
        out.append((logp * mask).sum(dim=1))
    return out[0], out[1]


class DPOTrainer(AlignTrainer):
    """DPO on :class:`~llm_engine.training.preferences.PairExamples`; ``evaluate`` gives the
    held-out loss, preference accuracy (``h > 0``), implicit reward margin ``β·h`` and the
    policy's own preference accuracy (chosen answer more likely than the rejected)."""

    plot_keys = ("loss", "accuracy", "margin", "val_accuracy", "val_margin",
                 "val_policy_accuracy", "val_reward_mean")

    def __init__(self, cfg: AlignConfig, model: Transformer, tokenizer: Tokenizer,
                 train_data: pref.PairExamples, val_data: pref.PairExamples, *,
                 device: torch.device | str = "cpu",
                 eval_prompts: list[pref.Messages] | None = None,
                 reward_fn: RewardFn | None = None) -> None:
        self.reference: Transformer | None = copy.deepcopy(model).eval().requires_grad_(False)
        super().__init__(cfg, model, tokenizer, train_data, val_data, device=device,
                         eval_prompts=eval_prompts, reward_fn=reward_fn)
        self.reference.to(self.device)
        self.ref = {name: torch.full((2, data.num_choices), float("nan"))
                    for name, data in (("train", train_data), ("val", val_data))}

    # -- the cached reference ------------------------------------------------------------
    @torch.no_grad()
    def reference_logprobs(self, split: str, indices: np.ndarray) -> tuple[torch.Tensor,
                                                                           torch.Tensor]:
        """Reference log-probs (chosen, rejected) ``(N,)`` of examples ``indices`` of
        ``split``, computing each missing fixed chunk once."""
        cache = self.ref[split]
        examples = self.train_data if split == "train" else self.val_data
        for chunk in sorted({int(i) // REF_CHUNK for i in indices}):
            rows = np.arange(chunk * REF_CHUNK, min((chunk + 1) * REF_CHUNK, cache.shape[1]))
            if torch.isnan(cache[0, rows]).any():
                if self.reference is None:
                    raise RuntimeError("reference model released before all values were cached")
                c, r = pair_logprobs(self.reference, examples, rows, self.device)
                cache[0, rows], cache[1, rows] = c.float().cpu(), r.float().cpu()
        if self.reference is not None and not any(torch.isnan(c).any() for c in self.ref.values()):
            self.reference = None  # every value cached: the frozen copy is no longer needed
        idx = torch.as_tensor(np.asarray(indices, dtype=np.int64))
        return cache[0, idx].to(self.device), cache[1, idx].to(self.device)

    def extra_tensors(self) -> dict[str, dict[str, torch.Tensor]]:
        return {REF_FILE: {name: t.clone() for name, t in self.ref.items()}}

    def load_extra(self, path: Path) -> None:
        saved = load_file(path / REF_FILE)
        for name, t in saved.items():
            if t.shape != self.ref[name].shape:
                raise ValueError(f"{path / REF_FILE}: {name} has shape {tuple(t.shape)}, the "
                                 f"data gives {tuple(self.ref[name].shape)}")
            self.ref[name] = t.clone()

    # -- steps and evaluation --------------------------------------------------------------
    def _losses(self, split: str, indices: np.ndarray):
        examples = self.train_data if split == "train" else self.val_data
        ref_c, ref_r = self.reference_logprobs(split, indices)
        pc, pr = pair_logprobs(self.model, examples, indices, self.device)
        loss, acc, margin = dpo_loss(pc, pr, ref_c, ref_r, self.cfg.beta, self.cfg.ipo)
        return loss, acc, margin, (pc > pr).float().mean()

    def train_step(self) -> dict[str, float]:
        cfg = self.cfg
        t0 = time.perf_counter()
        indices = data_lib.global_batch_indices(cfg.seed, self.step, self.global_batch,
                                                self.train_data.num_choices)
        self.reference_logprobs("train", indices)  # outside the timed update's autograd
        totals = torch.zeros(3)
        tokens = 0
        for micro in range(cfg.grad_accum):
            mine = data_lib.micro_batch_indices(indices, micro, cfg.grad_accum, 0, 1)
            loss, acc, margin, _ = self._losses("train", mine)
            (loss / cfg.grad_accum).backward()
            totals += torch.stack([loss.detach().cpu(), acc.cpu(), margin.detach().cpu()]) \
                / cfg.grad_accum
            tokens += sum(int(self.train_data.chosen.last[i] + self.train_data.rejected.last[i]) + 2
                          for i in mine)
        return self._finish_step(totals, tokens, t0)

    @torch.no_grad()
    def evaluate(self) -> dict[str, Any]:
        indices = data_lib.eval_indices(self.val_data.num_choices, self.cfg.eval_examples)
        self.model.eval()
        sums = torch.zeros(4)
        try:
            for start in range(0, len(indices), self.cfg.batch_size):
                part = indices[start:start + self.cfg.batch_size]
                loss, acc, margin, policy_acc = self._losses("val", part)
                sums += torch.stack([loss, acc, margin, policy_acc]).cpu() * len(part)
        finally:
            self.model.train()
        loss, acc, margin, policy_acc = (sums / len(indices)).tolist()
        record = {"step": self.step, "val_loss": loss, "val_accuracy": acc, "val_margin": margin,
                  "val_policy_accuracy": policy_acc, "val_pairs": len(indices)}
        return {**record, **self.behaviour()}


def build_dpo_trainer(cfg: AlignConfig, policy: Transformer, tokenizer: Tokenizer,
                      device: torch.device | str = "cpu",
                      eval_prompts: list[pref.Messages] | None = None,
                      reward_fn: RewardFn | None = None) -> DPOTrainer:
    """A :class:`DPOTrainer` on ``cfg.data`` (preference JSONL), the prompts in its last
    ``val_fraction`` held out."""
    pairs = pref.read_preferences(cfg.data)
    train, val = pref.split_pairs(pairs, cfg.val_fraction)
    return DPOTrainer(cfg, policy, tokenizer,
                      pref.build_pair_examples(train, tokenizer, cfg.max_len),
                      pref.build_pair_examples(val, tokenizer, cfg.max_len), device=device,
                      eval_prompts=eval_prompts, reward_fn=reward_fn)
