"""What the preference methods (reward model, DPO, GRPO) share: their config, a trainer
base over :class:`~llm_engine.training.trainer.Trainer`'s loop, checkpoints and logs, the
reward given on the command line, and the held-out behaviour check through the engine.

The loop (progress bar, Ctrl-C checkpoint, evaluation and checkpoint cadence), the
optimizer and LR schedule, atomic checkpoints and bitwise resume are the trainer's; a
method supplies ``train_step`` and ``evaluate``. Alignment runs in one process.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from llm_engine.tokenizer import Tokenizer
from llm_engine.training import preferences as pref
from llm_engine.training.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from llm_engine.training.trainer import TrainConfig, Trainer

RewardFn = Callable[[list, list[str]], list[float]]
METHODS = ("rm", "dpo", "grpo")


@dataclass
class AlignConfig(TrainConfig):
    """A :class:`TrainConfig` plus the preference methods' settings.

    - ``method``: ``rm`` (reward model, Bradley–Terry), ``dpo`` or ``grpo``.
    - ``data``: preference JSONL (rm, dpo); ``prompts`` / ``val_prompts``: prompt JSONL
      (grpo trains on ``prompts``; every method generates on ``val_prompts`` to check
      behaviour when a ``reward`` is set). ``"demo"`` in any of them: the shipped demo set
      (:mod:`llm_engine.training.demo_data`), written under ``out_dir/demo``.
    - ``beta``, ``ipo``: DPO's temperature and the IPO loss instead.
    - ``group_size``: GRPO samples per prompt (``batch_size`` prompts per step);
      ``max_new_tokens``: longest sampled answer; ``clip_eps``: PPO ratio clipping;
      ``kl_coef``: weight of the KL penalty to the reference; ``updates_per_rollout``:
      optimizer updates on each batch of samples (the first is on-policy).
    - ``reward``: ``rm:CHECKPOINT_DIR`` or ``python:module:function``.
    - ``max_len``: most tokens of prompt + answer in RM / DPO rows.
    - ``train_layers``: train only the last ``train_layers`` transformer blocks and the
      final norm (and a reward model's head); None trains every weight. The frozen bottom
      runs without autograd, so a step costs little more than a forward pass (what lets
      the CPU presets run in minutes).
    - ``plots``: redraw ``metrics.png`` at every evaluation.
    - ``bitwise_logprobs``: GRPO rollouts and the trainer's recomputation run through the
      batch-invariant ops (:mod:`llm_engine.training.batch_invariant`), so the engine's
      sampling log-probs equal the trainer's bit for bit (slower).
    """

    method: str = "rm"
    prompts: str | None = None
    val_prompts: str | None = None
    beta: float = 0.1
    ipo: bool = False
    group_size: int = 4
    max_new_tokens: int = 32
    clip_eps: float = 0.2
    kl_coef: float = 0.04
    updates_per_rollout: int = 1
    reward: str | None = None
    max_len: int = 128
    train_layers: int | None = None
    eval_max_tokens: int = 48
    plots: bool = True
    bitwise_logprobs: bool = False

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        for name in ("group_size", "max_new_tokens", "updates_per_rollout", "max_len",
                     "batch_size", "steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.method == "grpo" and self.group_size < 2:
            raise ValueError(f"group_size must be >= 2 for group-relative advantages, got "
                             f"{self.group_size}")
        if self.beta <= 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")
        if not 0 < self.clip_eps < 1:
            raise ValueError(f"clip_eps must be in (0, 1), got {self.clip_eps}")
        if self.train_layers is not None and (isinstance(self.train_layers, bool)
                                              or not isinstance(self.train_layers, int)
                                              or self.train_layers < 0):
            raise ValueError(f"train_layers must be a non-negative int or None, got "
                             f"{self.train_layers!r}")
        if self.kl_coef < 0:
            raise ValueError(f"kl_coef must be >= 0, got {self.kl_coef}")


def freeze_bottom(model: torch.nn.Module, train_layers: int | None) -> None:
    """Leave only the last ``train_layers`` blocks of ``model`` (a ``Transformer``) and its
    final norm trainable (None: everything)."""
    if train_layers is None:
        return
    keep = {f"layers.{i}." for i in range(max(0, len(model.layers) - train_layers),
                                         len(model.layers))}
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("norm.") or any(name.startswith(k) for k in keep))


def resolve_demo(source: str | None, key: str, out_dir: str) -> str | None:
    """``source``, or the demo file ``key`` (written under ``out_dir/demo``) for ``"demo"``."""
    if source != "demo":
        return source
    from llm_engine.training.demo_data import write_demo

    return str(write_demo(Path(out_dir) / "demo")[key])


def checked_rewards(fn: RewardFn, prompts: list, responses: list[str]) -> list[float]:
    """``fn(prompts, responses)`` as floats, checked to be one finite number per response."""
    values = fn(prompts, responses)
    if not isinstance(values, (list, tuple)) or len(values) != len(responses):
        raise ValueError(f"the reward function must return a list of {len(responses)} floats, "
                         f"got {type(values).__name__} of length "
                         f"{len(values) if hasattr(values, '__len__') else '?'}")
    out = [float(v) for v in values]
    if not all(math.isfinite(v) for v in out):
        raise ValueError(f"the reward function returned a non-finite value: {out}")
    return out


def prompt_question(messages: pref.Messages) -> str:
    """The text a program reward sees as the prompt: the last user turn's content."""
    users = [m["content"] for m in messages if m["role"] == "user"]
    return users[-1] if users else messages[-1]["content"]


class AlignTrainer(Trainer):
    """Base of the preference trainers: checkpoints with extra tensors, JSONL logs and a
    plot of the method's metrics, and the held-out behaviour check (greedy answers to
    ``val_prompts`` scored by ``reward``)."""

    cfg: AlignConfig
    plot_keys: tuple[str, ...] = ("loss",)

    def __init__(self, cfg: AlignConfig, model: torch.nn.Module, tokenizer: Tokenizer,
                 train_data: Any, val_data: Any, *, device: torch.device | str = "cpu",
                 eval_prompts: list[pref.Messages] | None = None,
                 reward_fn: RewardFn | None = None) -> None:
        super().__init__(cfg, model, tokenizer, train_data, val_data, device=device)
        self.eval_prompts = eval_prompts or []
        self.reward_fn = reward_fn
        self._llm = None
        self._samples: list[str] = []

    # -- checkpoints -------------------------------------------------------------------
    def backbone(self) -> torch.nn.Module:
        """The ``Transformer`` written as the checkpoint's model."""
        return self.model

    def extra_tensors(self) -> dict[str, dict[str, torch.Tensor]]:
        """Files of tensors saved with each checkpoint beside the model."""
        return {}

    def load_extra(self, path: Path) -> None:
        """Read back what :meth:`extra_tensors` saved in checkpoint ``path``."""

    def save(self) -> Path:
        state = {"data": {"seed": self.cfg.seed, "next_step": self.step,
                          "global_batch": self.global_batch,
                          "sampler": "global_batch_indices(seed, step)"},
                 "config": asdict(self.cfg)}
        return save_checkpoint(self.out, self.step, self.backbone(), self.tokenizer,
                               self.optimizer, self.scheduler, state,
                               keep_last=self.cfg.keep_checkpoints,
                               extra_tensors=self.extra_tensors())

    def resume(self, path: str | Path | None = None) -> bool:
        path = Path(path) if path is not None else latest_checkpoint(self.out)
        if path is None:
            return False
        state = load_checkpoint(path, self.backbone(), self.optimizer, self.scheduler)
        saved_batch = state["data"]["global_batch"]
        if saved_batch != self.global_batch:
            raise ValueError(f"checkpoint {path} was trained with global batch {saved_batch}, "
                             f"this run has {self.global_batch}: resuming would change the data")
        self.load_extra(path)
        self.step = state["step"]
        self._apply_hyperparameters()
        if self.log_path.is_file():
            kept = [line for line in self.log_path.read_text().splitlines()
                    if json.loads(line).get("step", 0) <= self.step]
            self.log_path.write_text("".join(line + "\n" for line in kept))
        return True

    # -- behaviour on held-out prompts ---------------------------------------------------
    def engine(self):
        """An :class:`~llm_engine.LLM` over the live policy weights (built once; it sees
        every optimizer update without a reload: the packed CPU weights are remade when a
        weight's version changes, CUDA graphs read the parameters in place)."""
        if self._llm is None:
            from llm_engine import LLM

            policy = self.backbone()
            c = policy.config
            streams = max(1, len(self.eval_prompts[:self.cfg.eval_examples]),
                          self.cfg.batch_size * self.cfg.group_size)
            longest = self.cfg.max_len + max(self.cfg.max_new_tokens, self.cfg.eval_max_tokens)
            block = 16
            blocks = streams * (-(-longest // block) + 1)
            block_bytes = (2 * c.num_layers * block * c.num_kv_heads * c.head_dim
                           * next(policy.parameters()).element_size())
            # No prefix caching: cached prompt K/V would outlive the weights that made it.
            self._llm = LLM.from_modules(policy, self.tokenizer, block_size=block,
                                         max_num_seqs=streams, kv_cache_memory=blocks * block_bytes,
                                         enable_prefix_caching=False)
            policy.train()
        return self._llm

    @torch.no_grad()
    def behaviour(self) -> dict[str, Any]:
        """Greedy answers to the held-out prompts (``eval_examples`` of them): their mean
        reward and length (tokens); the first three become :meth:`sample`'s."""
        if not self.eval_prompts or self.reward_fn is None:
            return {}
        from llm_engine import SamplingParams

        prompts = self.eval_prompts[:self.cfg.eval_examples]
        ids = [pref.encode_prompt(self.tokenizer, m) for m in prompts]
        params = SamplingParams(temperature=0.0, max_tokens=self.cfg.eval_max_tokens)
        outputs = self.engine().generate(ids, params, use_tqdm=False)
        self.backbone().train()
        texts = [o.outputs[0].text for o in outputs]
        rewards = checked_rewards(self.reward_fn, [prompt_question(m) for m in prompts], texts)
        lengths = [len(o.outputs[0].token_ids) for o in outputs]
        self._samples = [f"{prompt_question(m)} -> {t}"
                         for m, t in zip(prompts[:3], texts, strict=False)]
        return {"val_reward_mean": sum(rewards) / len(rewards),
                "val_response_len": sum(lengths) / len(lengths)}

    def sample(self) -> list[str]:
        """The held-out answers of the last :meth:`behaviour` check (three at most)."""
        return self._samples

    def _finish_step(self, totals: torch.Tensor, tokens: int, t0: float) -> dict[str, float]:
        """Clip, step the optimiser and the schedule, and make the step's log record from
        ``totals`` (loss, accuracy, margin: means over the micro-batches)."""
        cfg = self.cfg
        grad_norm = torch.nn.utils.clip_grad_norm_(
            self.model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        dt = time.perf_counter() - t0
        loss, acc, margin = totals.tolist()
        return {"step": self.step, "loss": loss, "accuracy": acc, "margin": margin, "lr": lr,
                "grad_norm": float(grad_norm), "tokens_per_s": tokens / dt, "step_ms": dt * 1e3}

    def describe_eval(self, record: dict[str, Any]) -> str:
        shown = {k: v for k, v in record.items() if isinstance(v, float)}
        return f"step {record['step']}: " + ", ".join(f"{k} {v:.4g}" for k, v in shown.items())

    # -- plot -------------------------------------------------------------------------
    def plot(self) -> Path | None:
        """``metrics.png``: the method's per-step metrics and the held-out ones."""
        if not self.cfg.plots or not self.log_path.is_file():
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        records = [json.loads(line) for line in self.log_path.read_text().splitlines()]
        keys = [k for k in self.plot_keys if any(k in r for r in records)]
        if not keys:
            return None
        fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 3), squeeze=False)
        for ax, key in zip(axes[0], keys, strict=True):
            points = [(r["step"], r[key]) for r in records if key in r]
            style = "o-" if key.startswith("val_") else "-"
            ax.plot(*zip(*points, strict=True), style, linewidth=1)
            ax.set_title(key, fontsize=9)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
        fig.suptitle(f"{self.cfg.preset} ({self.cfg.method})", fontsize=10)
        fig.tight_layout()
        path = self.out / "metrics.png"
        fig.savefig(path, dpi=100, bbox_inches="tight")
        plt.close(fig)
        return path
