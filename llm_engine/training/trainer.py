"""The training loop: pretraining and supervised fine-tuning, one process or many (torchrun).

``train(config)`` builds everything from a :class:`TrainConfig` (tokenizer, data, model,
optimizer, distributed setup) and runs :class:`Trainer`. A step draws its global batch
from ``(seed, step)`` (see :mod:`llm_engine.training.data`), so a run resumed from a
checkpoint continues exactly, and N processes train like one with the same global batch
(global batch = batch_size × world size × grad_accum windows).

The loss is the fused linear cross-entropy (``llm_engine.ops.cross_entropy``): the
logits are never materialised for the whole batch. ``fused_loss=False`` uses the plain
``F.cross_entropy`` on full fp32 logits instead (for comparison).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from llm_engine import ops
from llm_engine.config import ModelConfig
from llm_engine.model import Transformer
from llm_engine.tokenizer import Tokenizer
from llm_engine.training import data as data_lib
from llm_engine.training.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from llm_engine.training.presets import get_preset


@dataclass
class TrainConfig:
    """Everything a run needs. ``batch_size`` is per process and micro-step."""

    out_dir: str = "runs/tiny"
    preset: str = "tiny"
    data: str = "stdlib"
    steps: int = 300
    batch_size: int = 16
    grad_accum: int = 1
    seq_len: int = 128
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 30
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    eval_every: int = 50
    eval_examples: int = 64
    ckpt_every: int = 100
    keep_checkpoints: int = 2
    log_every: int = 10
    seed: int = 0
    vocab_size: int = 4096
    tokenizer: str | None = None  # None: the preset's
    init_from: str | None = None  # None: the preset's
    model_overrides: dict[str, Any] = field(default_factory=dict)
    stdlib_max_bytes: int = data_lib.STDLIB_MAX_BYTES
    val_fraction: float = 0.05
    fused_loss: bool = True
    compile: bool = False
    gradient_checkpointing: bool = False
    autocast: bool = True  # bf16 autocast on CUDA
    device: str | None = None
    num_samples: int = 2
    sample_tokens: int = 48
    progress: bool = True
    resume: bool = False

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> TrainConfig:
        """The preset's defaults, then ``overrides`` (``None`` values are ignored)."""
        preset = get_preset(name)
        known = {f.name for f in fields(cls)}
        values = {**preset.defaults, **{k: v for k, v in overrides.items() if v is not None}}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown TrainConfig fields: {sorted(unknown)}")
        return cls(preset=name, **values)


class Examples(Protocol):
    """A dataset the sampler draws from: ``num_choices`` examples, ``get(indices)`` gives
    ``(inputs, targets)`` int64 ``(len(indices), seq_len)`` tensors."""

    @property
    def num_choices(self) -> int: ...

    def get(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]: ...


class WarmupCosine:
    """LR multiplier: linear warmup over ``warmup`` steps, then cosine decay to ``min_ratio``
    at ``total`` steps (kept there afterwards)."""

    def __init__(self, warmup: int, total: int, min_ratio: float) -> None:
        self.warmup, self.total, self.min_ratio = warmup, total, min_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class LossModule(nn.Module):
    """``forward(inputs, targets) -> mean loss`` over non-ignored targets; what DDP wraps."""

    def __init__(self, model: Transformer, fused_loss: bool = True) -> None:
        super().__init__()
        self.model = model
        self.fused_loss = fused_loss

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        hidden = self.model.forward_batch(inputs)
        return lm_loss(hidden, self.model.lm_head_weight, targets.reshape(-1), self.fused_loss)


def lm_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
            fused: bool = True) -> torch.Tensor:
    """Mean next-token cross-entropy of ``hidden (T, H)`` through ``weight (V, H)``.

    Under autocast both are cast to the autocast dtype (bf16 matmuls), else the weight to
    the hidden states' dtype; the casts are differentiable, so the fp32 master weights still
    get their gradients.
    """
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
    elif weight.dtype != hidden.dtype:
        weight = weight.to(hidden.dtype)
    if fused:
        return ops.cross_entropy(hidden, weight, targets, ignore_index=data_lib.IGNORE_INDEX)
    logits = F.linear(hidden, weight).float()
    return F.cross_entropy(logits, targets, ignore_index=data_lib.IGNORE_INDEX)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices only: not on norms, biases or embeddings."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.dim() < 2 or "embed" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str | None) -> tuple[DistInfo, torch.device]:
    """Join the torchrun process group (gloo on CPU, NCCL on CUDA) when ``WORLD_SIZE > 1``."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    info = DistInfo(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", info.local_rank if dev.index is None else dev.index)
        torch.cuda.set_device(dev)
    if info.enabled and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return info, dev


class Trainer:
    """Runs optimizer steps, evaluation, logging and checkpoints for one model."""

    def __init__(self, cfg: TrainConfig, model: Transformer, tokenizer: Tokenizer,
                 train_data: Examples, val_data: Examples, *, device: torch.device | str = "cpu",
                 dist_info: DistInfo | None = None, prompts: list[str] | None = None) -> None:
        self.cfg = cfg
        self.device = torch.device(device)
        self.dist = dist_info or DistInfo()
        self.tokenizer = tokenizer
        self.train_data, self.val_data = train_data, val_data
        self.prompts = prompts or []
        self.model = model.to(self.device)
        self.model.train()
        self.model.gradient_checkpointing = cfg.gradient_checkpointing
        if cfg.compile:
            self.model.compile()
        self.loss_module: nn.Module = LossModule(self.model, cfg.fused_loss)
        if self.dist.enabled:
            self.loss_module = nn.parallel.DistributedDataParallel(
                self.loss_module,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                broadcast_buffers=False)  # the only buffers are constant RoPE tables
        self.optimizer = torch.optim.AdamW(
            param_groups(self.model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
            fused=self.device.type == "cuda")
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, WarmupCosine(cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio))
        self.step = 0
        self.global_batch = cfg.batch_size * self.dist.world_size * cfg.grad_accum
        self.out = Path(cfg.out_dir)
        self.log_path = self.out / "log.jsonl"
        self._stop_requested = False

    # -- one step ------------------------------------------------------------------------
    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.cfg.autocast and self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def train_step(self) -> dict[str, float]:
        """One optimizer step on the global batch of ``self.step``; returns its metrics."""
        cfg = self.cfg
        t0 = time.perf_counter()
        indices = data_lib.global_batch_indices(cfg.seed, self.step, self.global_batch,
                                                self.train_data.num_choices)
        total = torch.zeros((), device=self.device)
        for micro in range(cfg.grad_accum):
            mine = data_lib.micro_batch_indices(indices, micro, cfg.grad_accum, self.dist.rank,
                                                self.dist.world_size)
            inputs, targets = (t.to(self.device, non_blocking=True)
                               for t in self.train_data.get(mine))
            sync = (contextlib.nullcontext() if not self.dist.enabled
                    or micro == cfg.grad_accum - 1 else self.loss_module.no_sync())
            with sync:
                with self._autocast():
                    loss = self.loss_module(inputs, targets) / cfg.grad_accum
                loss.backward()
            total += loss.detach()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(),
                                                   cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.dist.enabled:
            dist.all_reduce(total, op=dist.ReduceOp.AVG)
        self.step += 1
        loss_value = total.item()
        dt = time.perf_counter() - t0
        tokens = self.global_batch * cfg.seq_len
        return {"step": self.step, "loss": loss_value, "lr": lr, "grad_norm": float(grad_norm),
                "tokens_per_s": tokens / dt, "step_ms": dt * 1e3}

    # -- evaluation ----------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Validation loss (mean over non-ignored target tokens) and perplexity."""
        indices = data_lib.eval_indices(self.val_data.num_choices, self.cfg.eval_examples)
        mine = indices[self.dist.rank::self.dist.world_size]
        sums = torch.zeros(2, dtype=torch.float64, device=self.device)  # loss · tokens, tokens
        self.model.eval()
        try:
            for start in range(0, len(mine), self.cfg.batch_size):
                inputs, targets = (t.to(self.device)
                                   for t in self.val_data.get(mine[start:start + self.cfg.batch_size]))
                count = (targets != data_lib.IGNORE_INDEX).sum()
                with self._autocast():
                    hidden = self.model.forward_batch(inputs)
                    loss = lm_loss(hidden, self.model.lm_head_weight, targets.reshape(-1),
                                   self.cfg.fused_loss)
                sums[0] += loss.double() * count
                sums[1] += count
        finally:
            self.model.train()
        if self.dist.enabled:
            dist.all_reduce(sums)
        val_loss = (sums[0] / sums[1].clamp(min=1)).item()
        return {"step": self.step, "val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0))}

    def sample(self) -> list[str]:
        """Continuations of the first ``num_samples`` prompts through the generation API
        (temperature 0.8, seeded), with a KV cache sized for just these requests."""
        prompts = self.prompts[:self.cfg.num_samples]
        if not prompts:
            return []
        from llm_engine import LLM, SamplingParams

        longest = max(len(self.tokenizer.encode(p)) for p in prompts) + self.cfg.sample_tokens
        self.model.eval()
        try:  # a KV cache for these prompts only
            llm = LLM.from_modules(self.model, self.tokenizer, enforce_eager=True,
                                   max_num_seqs=len(prompts), max_model_len=min(
                                       longest, self.model.config.max_position_embeddings))
            params = [SamplingParams(temperature=0.8, max_tokens=self.cfg.sample_tokens, seed=i)
                      for i in range(len(prompts))]
            outputs = llm.generate(prompts, params, use_tqdm=False)
        finally:
            self.model.train()
        return [p + o.outputs[0].text for p, o in zip(prompts, outputs, strict=True)]

    # -- checkpoints and logs ------------------------------------------------------------
    def save(self) -> Path:
        """Write a checkpoint of the current step (call on the main process)."""
        state = {"data": {"seed": self.cfg.seed, "next_step": self.step,
                          "global_batch": self.global_batch,
                          "sampler": "global_batch_indices(seed, step)"},
                 "config": asdict(self.cfg)}
        return save_checkpoint(self.out, self.step, self.model, self.tokenizer, self.optimizer,
                               self.scheduler, state, keep_last=self.cfg.keep_checkpoints)

    def resume(self, path: str | os.PathLike | None = None) -> bool:
        """Load the latest (or given) checkpoint; False when there is none.

        Weights, optimizer moments, step and RNG states come from the checkpoint; the
        hyperparameters (peak LR, schedule length, warmup, weight decay, betas) are this
        run's config, so ``--steps`` can extend a finished run. With an unchanged config the
        run continues bit for bit.
        """
        path = Path(path) if path is not None else latest_checkpoint(self.out)
        if path is None:
            return False
        state = load_checkpoint(path, self.model, self.optimizer, self.scheduler)
        saved_batch = state["data"]["global_batch"]
        if saved_batch != self.global_batch:
            raise ValueError(f"checkpoint {path} was trained with global batch {saved_batch}, "
                             f"this run has {self.global_batch}: resuming would change the data")
        self.step = state["step"]
        self._apply_hyperparameters()
        if self.dist.is_main and self.log_path.is_file():
            kept = [line for line in self.log_path.read_text().splitlines()
                    if json.loads(line).get("step", 0) <= self.step]
            self.log_path.write_text("".join(line + "\n" for line in kept))
        return True

    def _apply_hyperparameters(self) -> None:
        """Set the optimizer's groups and the LR schedule from ``self.cfg`` (LambdaLR's own
        formula, ``base_lr * schedule(step)``, so nothing changes when the config doesn't)."""
        cfg = self.cfg
        schedule = WarmupCosine(cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio)
        groups = self.optimizer.param_groups
        self.scheduler.lr_lambdas = [schedule for _ in groups]
        self.scheduler.base_lrs = [cfg.lr for _ in groups]
        for group, decay in zip(groups, (cfg.weight_decay, 0.0), strict=True):
            group.update(initial_lr=cfg.lr, lr=cfg.lr * schedule(self.scheduler.last_epoch),
                         weight_decay=decay, betas=(cfg.beta1, cfg.beta2))

    def _log(self, record: dict[str, Any]) -> None:
        if not self.dist.is_main:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def plot(self) -> Path | None:
        """Write ``loss.png`` (training and validation loss against step) from the log."""
        if not self.dist.is_main or not self.log_path.is_file():
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        records = [json.loads(line) for line in self.log_path.read_text().splitlines()]
        train = [(r["step"], r["loss"]) for r in records if "loss" in r]
        val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
        fig, ax = plt.subplots(figsize=(7, 4))
        if train:
            ax.plot(*zip(*train, strict=True), label="train", linewidth=1)
        if val:
            ax.plot(*zip(*val, strict=True), "o-", label="validation")
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats/token)")
        ax.set_title(f"{self.cfg.preset}: {self.model.num_parameters() / 1e6:.1f}M parameters")
        ax.grid(alpha=0.3)
        ax.legend()
        path = self.out / "loss.png"
        fig.savefig(path, dpi=100, bbox_inches="tight")
        plt.close(fig)
        return path

    def describe_eval(self, record: dict[str, Any]) -> str:
        """One line for the progress bar about an evaluation record."""
        return f"step {record['step']}: val loss {record['val_loss']:.4f} (ppl {record['val_ppl']:.1f})"

    def _eval_and_log(self) -> dict[str, Any]:
        record: dict[str, Any] = self.evaluate()
        if self.dist.is_main:
            record["samples"] = self.sample()
        self._log(record)
        self.plot()
        return record

    # -- the loop ------------------------------------------------------------------------
    def request_stop(self, *_: Any) -> None:
        """Finish the current step, write a checkpoint, then raise ``KeyboardInterrupt``.
        A second request interrupts at once."""
        if self._stop_requested:
            raise KeyboardInterrupt
        self._stop_requested = True

    def fit(self) -> dict[str, Any]:
        """Train from ``self.step`` to ``cfg.steps``; returns the first and last evaluations.

        Ctrl-C (SIGINT) stops after the current step with a checkpoint, then re-raises
        ``KeyboardInterrupt``.
        """
        cfg = self.cfg
        handler_installed = False
        if hasattr(signal, "SIGINT") and _in_main_thread():
            previous = signal.signal(signal.SIGINT, self.request_stop)
            handler_installed = True
        evals: list[dict[str, Any]] = []
        bar = tqdm(total=cfg.steps, initial=self.step, desc="training", unit="step",
                   disable=not (cfg.progress and self.dist.is_main), file=sys.stderr)
        try:
            evals.append(self._eval_and_log())
            window: list[dict[str, float]] = []  # steps since the last log record
            while self.step < cfg.steps:
                metrics = self.train_step()
                window.append(metrics)
                bar.update(1)
                bar.set_postfix(loss=f"{metrics['loss']:.3f}", lr=f"{metrics['lr']:.2e}")
                if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                    self._log(_mean_metrics(window))
                    window = []
                last = self.step == cfg.steps
                if (cfg.eval_every > 0 and self.step % cfg.eval_every == 0) or last:
                    evals.append(self._eval_and_log())
                    bar.write(self.describe_eval(evals[-1]))
                if self.dist.is_main and ((cfg.ckpt_every > 0 and self.step % cfg.ckpt_every == 0)
                                          or last or self._stop_requested):
                    path = self.save()
                    if self._stop_requested:
                        bar.write(f"interrupted: checkpoint {path}; continue with --resume")
                if self._stop_requested:
                    raise KeyboardInterrupt
        finally:
            bar.close()
            if handler_installed:
                signal.signal(signal.SIGINT, previous)
        return {"first_eval": evals[0], "last_eval": evals[-1], "step": self.step,
                "parameters": self.model.num_parameters()}


def _mean_metrics(window: list[dict[str, float]]) -> dict[str, float]:
    """One log record for consecutive steps: the last step's number, LR and gradient norm,
    the mean loss, and throughput over the whole window."""
    last = window[-1]
    total_ms = sum(m["step_ms"] for m in window)
    tokens = sum(m["tokens_per_s"] * m["step_ms"] for m in window) / 1e3
    return {**last, "loss": sum(m["loss"] for m in window) / len(window),
            "tokens_per_s": tokens / (total_ms / 1e3), "step_ms": total_ms / len(window)}


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


# -- building a run from a config ---------------------------------------------------------

def _round_up(n: int, multiple: int) -> int:
    return (n + multiple - 1) // multiple * multiple


def _barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def _load_tokenizer(cfg: TrainConfig, kind: str, files: list[Path] | None, out: Path,
                    info: DistInfo) -> Tokenizer:
    """The run's tokenizer, saved under ``out/tokenizer`` (trained there once by rank 0)."""
    saved = out / "tokenizer"
    if (saved / "tokenizer.json").is_file():
        return Tokenizer.load(saved)
    if kind == "train":
        if files is None:
            raise ValueError("a new tokenizer is trained on text data; chat JSONL needs "
                             "--tokenizer smollm2 or a tokenizer directory")
        if info.is_main:
            tok = data_lib.train_tokenizer(data_lib.read_texts(files), cfg.vocab_size)
            tok.save(saved)
        _barrier(info)
        return Tokenizer.load(saved)
    if kind == "smollm2":
        from llm_engine.loader import load_model

        _, tok = load_model("smollm2", device="cpu", dtype=torch.float32)
        return tok
    return Tokenizer.load(kind)


def _is_chat_data(source: str) -> bool:
    return source.endswith(".jsonl") and Path(source).is_file()


def build_data(cfg: TrainConfig, tokenizer: Tokenizer, info: DistInfo
               ) -> tuple[Examples, Examples, list[str]]:
    """Training and validation examples plus sampling prompts for ``cfg.data``."""
    if _is_chat_data(cfg.data):
        conversations = data_lib.read_chat_jsonl(cfg.data)
        examples = data_lib.build_sft_examples(conversations, tokenizer, cfg.seq_len)
        if len(conversations) >= 20:
            n_val = max(1, int(len(conversations) * cfg.val_fraction))
            train = data_lib.SFTExamples(examples.inputs[:-n_val], examples.targets[:-n_val])
            val = data_lib.SFTExamples(examples.inputs[-n_val:], examples.targets[-n_val:])
            val_convs = conversations[-n_val:]
        else:
            train, val, val_convs = examples, examples, conversations
        prompts = []
        for messages in val_convs[:cfg.num_samples]:
            first = next((i for i, m in enumerate(messages) if m.get("role") == "assistant"), 0)
            if first:
                prompts.append(tokenizer.apply_chat_template(messages[:first]))
        return train, val, prompts
    shard_dir = Path(cfg.out_dir) / "data"
    files = data_lib.text_files(cfg.data) if cfg.data != "stdlib" else \
        data_lib.stdlib_files(cfg.stdlib_max_bytes)
    if info.is_main:
        data_lib.build_shards(files, tokenizer, shard_dir, cfg.val_fraction,
                              progress=cfg.progress)
    _barrier(info)
    shards = data_lib.load_shards(shard_dir)
    train = data_lib.TokenWindows(shards.train, cfg.seq_len)
    val = data_lib.TokenWindows(shards.val, cfg.seq_len)
    if cfg.data == "stdlib":
        prompts = ["def", "import", "class"]
    else:
        prompts = [tokenizer.decode(val.get(np.array([o]))[0][0, :8].tolist())
                   for o in data_lib.eval_indices(val.num_choices, 3)]
    return train, val, prompts


def build_model(cfg: TrainConfig, tokenizer: Tokenizer, device: torch.device) -> Transformer:
    """A freshly initialised model of the preset's shape, its vocabulary the tokenizer's
    rounded up to a multiple of 64 (``cfg.model_overrides`` replace preset fields)."""
    preset = get_preset(cfg.preset)
    if preset.model is None:
        raise ValueError(f"preset {cfg.preset!r} fine-tunes an existing model; it has no shape")
    shape = {**preset.model.to_dict(), **cfg.model_overrides,
             "vocab_size": _round_up(tokenizer.vocab_size, 64)}
    shape["max_position_embeddings"] = max(shape["max_position_embeddings"], cfg.seq_len)
    torch.manual_seed(cfg.seed)
    return Transformer(ModelConfig.from_dict(shape)).to(device)


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run ``cfg`` end to end (under torchrun: in every process); returns :meth:`Trainer.fit`'s
    summary plus the output directory."""
    info, device = init_distributed(cfg.device)
    out = Path(cfg.out_dir)
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
    _barrier(info)
    preset = get_preset(cfg.preset)
    kind = cfg.tokenizer or preset.tokenizer
    chat = _is_chat_data(cfg.data)
    if preset.chat_data and not chat:
        raise ValueError(f"preset {cfg.preset!r} fine-tunes on conversations: --data must be a "
                         f".jsonl file of {{\"messages\": [...]}} lines, got {cfg.data!r}")
    files = None
    if kind == "train" and not chat:
        files = (data_lib.stdlib_files(cfg.stdlib_max_bytes) if cfg.data == "stdlib"
                 else data_lib.text_files(cfg.data))
    init_from = cfg.init_from or preset.init_from
    model = None
    if init_from is not None:
        from llm_engine.loader import load_model

        model, tokenizer = load_model(init_from, device=device, dtype=torch.float32,
                                       quantization="none")
        if cfg.tokenizer is not None:
            tokenizer = _load_tokenizer(cfg, kind, files, out, info)
    else:
        tokenizer = _load_tokenizer(cfg, kind, files, out, info)
    if info.is_main and not (out / "tokenizer" / "tokenizer.json").is_file():
        tokenizer.save(out / "tokenizer")
    train_data, val_data, prompts = build_data(cfg, tokenizer, info)
    if model is None:
        model = build_model(cfg, tokenizer, device)
    trainer = Trainer(cfg, model, tokenizer, train_data, val_data, device=device, dist_info=info,
                      prompts=prompts)
    if cfg.resume and not trainer.resume() and info.is_main:
        print(f"no checkpoint under {out}; starting from scratch", file=sys.stderr)
    try:
        summary = trainer.fit()
    finally:
        if info.enabled and dist.is_initialized():
            dist.destroy_process_group()
    return {**summary, "out_dir": str(out)}
