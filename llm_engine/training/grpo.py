"""GRPO: group-relative policy optimisation with rollouts from our engine.

A step draws ``batch_size`` prompts, and the engine (over the live policy weights, see
:meth:`AlignTrainer.engine`) samples ``group_size`` answers to each at temperature 1
(one request with ``n = group_size``: the prompt is computed once and forked with
copy-on-write), returning each sampled token's log-prob. The reward (a reward model or a
program) scores every answer; advantages are the rewards standardised within their
group. The trainer recomputes the answers' log-probs with gradients through the chunked
log-prob path, and the frozen reference policy's; the loss is the PPO-clipped
objective against the sampling log-probs plus ``kl_coef`` times the k3 KL estimate to
the reference (:func:`~llm_engine.training.losses.grpo_loss`), averaged per answer, one
prompt group per micro-step. ``updates_per_rollout`` optimizer updates reuse the
samples (only the first is on-policy; the clipping bounds the later ones).

Every step logs ``reward_mean``, ``reward_std``, ``kl``, ``response_len``, ``clip_frac``,
and ``logprob_mismatch`` (mean and max absolute difference between the engine's sampling
log-probs and the trainer's recomputed ones, before the update) with the time spent in
rollout, scoring and update. With ``bitwise_logprobs`` the rollout and the recomputation
run through :mod:`llm_engine.training.batch_invariant` and the mismatch is exactly 0.
Sampling seeds come from ``(seed, step, prompt)``, so a
resumed run draws the same answers.
"""

from __future__ import annotations

import copy
import math
import time
from typing import Any

import numpy as np
import torch

from llm_engine.model import Transformer
from llm_engine.tokenizer import Tokenizer
from llm_engine.training import batch_invariant
from llm_engine.training import data as data_lib
from llm_engine.training import preferences as pref
from llm_engine.training.alignment import (
    AlignConfig,
    AlignTrainer,
    RewardFn,
    checked_rewards,
    prompt_question,
)
from llm_engine.training.losses import (
    group_advantages,
    grpo_loss,
    policy_and_reference_logprobs,
    sequence_logprobs,
    shared_bottom,
)


class PromptSet:
    """Prompts (conversations) the step sampler draws from."""

    def __init__(self, prompts: list[pref.Messages]) -> None:
        self.prompts = prompts

    @property
    def num_choices(self) -> int:
        return len(self.prompts)


def rollout_seed(seed: int, step: int, index: int) -> int:
    """The sampling seed of prompt ``index`` of step ``step``."""
    return int(np.random.default_rng([seed, step, index, 16]).integers(0, 2**62))


class GRPOTrainer(AlignTrainer):
    """GRPO against ``reward_fn`` with a frozen copy of the starting policy as reference."""

    plot_keys = ("reward_mean", "kl", "response_len", "clip_frac", "logprob_mismatch",
                 "val_reward_mean", "val_response_len")

    def __init__(self, cfg: AlignConfig, model: Transformer, tokenizer: Tokenizer,
                 prompts: list[pref.Messages], *, reward_fn: RewardFn,
                 device: torch.device | str = "cpu",
                 eval_prompts: list[pref.Messages] | None = None) -> None:
        # The reference shares the policy's frozen weights (no copy) and runs the frozen
        # bottom blocks once with it (policy_and_reference_logprobs).
        frozen = {id(p): p for p in model.parameters() if not p.requires_grad}
        self.reference = copy.deepcopy(model, frozen).eval().requires_grad_(False)
        self.shared_layers = shared_bottom(model, self.reference)
        data = PromptSet(prompts)
        super().__init__(cfg, model, tokenizer, data, data, device=device,
                         eval_prompts=eval_prompts, reward_fn=reward_fn)
        self.reference.to(self.device)
        self.global_batch = cfg.batch_size  # prompts per step
        self._encoded: dict[int, list[int]] = {}

    def _prompt_ids(self, index: int) -> list[int]:
        if index not in self._encoded:
            self._encoded[index] = pref.encode_prompt(self.tokenizer, self.train_data.prompts[index])
        return self._encoded[index]

    # -- the three phases of a step --------------------------------------------------------
    def rollout(self, indices: np.ndarray) -> tuple[list[list[int]], list[list[int]],
                                                    list[list[float]], list[str]]:
        """``group_size`` sampled answers per prompt from the engine: prompt ids, answer
        ids and their sampling log-probs, answer texts (prompt-major order)."""
        from llm_engine import SamplingParams

        cfg = self.cfg
        prompts = [self._prompt_ids(int(i)) for i in indices]
        params = [SamplingParams(n=cfg.group_size, temperature=1.0, max_tokens=cfg.max_new_tokens,
                                 seed=rollout_seed(cfg.seed, self.step, j), logprobs=0)
                  for j in range(len(prompts))]
        with batch_invariant.enabled(cfg.bitwise_logprobs):
            outputs = self.engine().generate(prompts, params, use_tqdm=False)
        self.model.train()
        p_ids, r_ids, r_lps, texts = [], [], [], []
        for ids, out in zip(prompts, outputs, strict=True):
            for c in sorted(out.outputs, key=lambda c: c.index):
                p_ids.append(ids)
                r_ids.append(list(c.token_ids))
                r_lps.append([lp[t] for t, lp in zip(c.token_ids, c.logprobs, strict=True)])
                texts.append(c.text)
        return p_ids, r_ids, r_lps, texts

    def train_step(self) -> dict[str, float]:
        cfg = self.cfg
        G = cfg.group_size
        t0 = time.perf_counter()
        indices = data_lib.global_batch_indices(cfg.seed, self.step, cfg.batch_size,
                                                self.train_data.num_choices)
        p_ids, r_ids, r_lps, texts = self.rollout(indices)
        t1 = time.perf_counter()
        questions = [prompt_question(self.train_data.prompts[int(i)]) for i in indices
                     for _ in range(G)]
        rewards = torch.tensor(checked_rewards(self.reward_fn, questions, texts))
        advantages = group_advantages(rewards.view(-1, G)).view(-1)
        t2 = time.perf_counter()

        pad = self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else 0
        groups = []
        for g in range(len(indices)):
            rows = slice(g * G, (g + 1) * G)
            batch = pref.build_sequences(p_ids[rows], r_ids[rows], pad)
            old = torch.zeros(batch.targets.shape)
            for row, (p, lps) in enumerate(zip(p_ids[rows], r_lps[rows], strict=True)):
                old[row, len(p) - 1:len(p) - 1 + len(lps)] = torch.tensor(lps)
            groups.append((batch, old.to(self.device), advantages[rows].to(self.device)))

        mismatch_sum, mismatch_max, n_tokens = 0.0, 0.0, 0
        kl_sum, clip_sum, loss_sum = 0.0, 0.0, 0.0
        grad_norm = 0.0
        lr = self.optimizer.param_groups[0]["lr"]
        refs: list[torch.Tensor] = []
        # The backward pass recomputes the chunked log-probs: it runs under the same ops.
        with batch_invariant.enabled(cfg.bitwise_logprobs):
            for update in range(cfg.updates_per_rollout):
                for g, (batch, old, adv) in enumerate(groups):
                    inputs, targets = batch.inputs.to(self.device), batch.targets.to(self.device)
                    if update == 0:
                        logp, ref, mask = policy_and_reference_logprobs(
                            self.model, self.reference, inputs, targets, self.shared_layers)
                        refs.append(ref)
                    else:
                        logp, mask = sequence_logprobs(self.model, inputs, targets)
                        ref = refs[g]
                    loss, stats = grpo_loss(logp, old, ref, adv, mask, cfg.clip_eps, cfg.kl_coef)
                    (loss / len(groups)).backward()
                    if update == 0:
                        diff = (logp.detach() - old).abs()[mask]
                        mismatch_sum += diff.sum().item()
                        mismatch_max = max(mismatch_max, diff.max().item() if diff.numel() else 0.0)
                        count = int(mask.sum())
                        n_tokens += count
                        kl_sum += stats["kl"].item() * count
                        clip_sum += stats["clip_frac"].item() * count
                        loss_sum += loss.item() / len(groups)
                grad_norm = float(torch.nn.utils.clip_grad_norm_(
                    self.model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else math.inf))
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1
        t3 = time.perf_counter()
        lengths = [len(r) for r in r_ids]
        total_tokens = sum(len(p) + len(r) for p, r in zip(p_ids, r_ids, strict=True))
        return {"step": self.step, "loss": loss_sum, "reward_mean": rewards.mean().item(),
                "reward_std": rewards.std().item(), "kl": kl_sum / max(n_tokens, 1),
                "response_len": sum(lengths) / len(lengths),
                "clip_frac": clip_sum / max(n_tokens, 1),
                "logprob_mismatch": mismatch_sum / max(n_tokens, 1),
                "logprob_mismatch_max": mismatch_max, "lr": lr, "grad_norm": grad_norm,
                "rollout_ms": (t1 - t0) * 1e3, "scoring_ms": (t2 - t1) * 1e3,
                "update_ms": (t3 - t2) * 1e3, "rollout_tokens_per_s": sum(lengths) / (t1 - t0),
                "tokens_per_s": total_tokens / (t3 - t0), "step_ms": (t3 - t0) * 1e3}

    @torch.no_grad()
    def evaluate(self) -> dict[str, Any]:
        """Greedy answers to the held-out prompts: mean reward and length, samples."""
        return {"step": self.step, **self.behaviour()}


def build_grpo_trainer(cfg: AlignConfig, policy: Transformer, tokenizer: Tokenizer,
                       reward_fn: RewardFn, device: torch.device | str = "cpu",
                       eval_prompts: list[pref.Messages] | None = None) -> GRPOTrainer:
    """A :class:`GRPOTrainer` on the prompts of ``cfg.prompts`` (JSONL)."""
    if cfg.prompts is None:
        raise ValueError("GRPO needs --prompts FILE (JSONL of {\"prompt\"} or {\"messages\"})")
    return GRPOTrainer(cfg, policy, tokenizer, pref.read_prompts(cfg.prompts),
                       reward_fn=reward_fn, device=device, eval_prompts=eval_prompts)
