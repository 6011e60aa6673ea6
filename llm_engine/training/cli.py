"""``llm-engine train``: the command-line front of :func:`llm_engine.training.trainer.train`.

``add_train_parser(subparsers)`` registers the sub-command; ``handle(args)`` runs it.
Every option left out takes the preset's default. Under ``torchrun`` every process runs
the same command (``torchrun --nproc_per_node=2 -m llm_engine.training --preset tiny``).
"""

from __future__ import annotations

import argparse
import json
import sys

from llm_engine.training.presets import PRESETS


def add_train_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``train`` to ``subparsers`` and return its parser."""
    p = subparsers.add_parser(
        "train", help="pretrain or fine-tune a model",
        description="Train a model from a preset on text files, a folder, the Python standard "
                    "library ('stdlib') or chat JSONL (supervised fine-tuning). Options left "
                    "out take the preset's value; Ctrl-C stops after the current step with a "
                    "checkpoint, --resume continues from it.")
    add_train_arguments(p)
    return p


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    presets = ", ".join(f"{name} ({preset.description})" for name, preset in PRESETS.items())
    p.add_argument("--preset", default=None, choices=list(PRESETS),
                   help=f"{presets}; default tiny, or smollm2-METHOD with --method")
    p.add_argument("--data", help="'stdlib', a text file or folder, or a .jsonl of "
                                  "{\"messages\": [...]} for fine-tuning")
    p.add_argument("--out", default=None, help="output directory (default runs/<preset>)")
    p.add_argument("--steps", type=int, help="optimizer steps")
    p.add_argument("--batch-size", type=int, help="sequences per process and micro-step")
    p.add_argument("--grad-accum", type=int, help="micro-steps per optimizer step")
    p.add_argument("--seq-len", type=int, help="tokens per training sequence")
    p.add_argument("--lr", type=float, help="peak learning rate")
    p.add_argument("--min-lr-ratio", type=float, help="final LR as a fraction of the peak")
    p.add_argument("--warmup-steps", type=int, help="linear warmup steps")
    p.add_argument("--weight-decay", type=float, help="AdamW weight decay (matrices only)")
    p.add_argument("--grad-clip", type=float, help="clip the gradient norm (0: off)")
    p.add_argument("--eval-every", type=int,
                   help="evaluate every N steps (0: only before and after training)")
    p.add_argument("--eval-examples", type=int, help="validation windows per evaluation")
    p.add_argument("--ckpt-every", type=int, help="checkpoint every N steps (0: at the end)")
    p.add_argument("--log-every", type=int, help="log mean training metrics every N steps")
    p.add_argument("--seed", type=int, help="data order and initialisation seed")
    p.add_argument("--vocab-size", type=int, help="size of a newly trained BPE vocabulary")
    p.add_argument("--tokenizer", help="'train', 'smollm2' or a tokenizer directory "
                                       "(default: the preset's)")
    p.add_argument("--init-from", help="fine-tune this model ('smollm2' or a directory)")
    p.add_argument("--model-config", type=json.loads, default=None, metavar="JSON",
                   help="ModelConfig fields overriding the preset's, e.g. "
                        "'{\"num_layers\": 2}'")
    p.add_argument("--stdlib-max-bytes", type=int, help="cap on the stdlib corpus size")
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda when available)")
    p.add_argument("--compile", action="store_true", default=None, help="torch.compile the model")
    p.add_argument("--gradient-checkpointing", action="store_true", default=None,
                   help="recompute activations in the backward pass")
    p.add_argument("--no-fused-loss", dest="fused_loss", action="store_false", default=None,
                   help="plain F.cross_entropy on full logits instead of the fused loss")
    p.add_argument("--no-autocast", dest="autocast", action="store_false", default=None,
                   help="train in fp32 on CUDA too")
    p.add_argument("--num-samples", type=int, help="sampled continuations per evaluation")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None,
                   help="no progress bars")
    p.add_argument("--resume", action="store_true", default=None,
                   help="continue from the latest checkpoint in --out")
    add_alignment_arguments(p)


def add_alignment_arguments(p: argparse.ArgumentParser) -> None:
    """Options of the preference methods (``--method rm|dpo|grpo``)."""
    g = p.add_argument_group("preference training (--method rm | dpo | grpo)")
    g.add_argument("--method", choices=("rm", "dpo", "grpo"),
                   help="reward model (Bradley-Terry), DPO, or GRPO with engine rollouts; "
                        "--data is then preference JSONL ({prompt|messages, chosen, "
                        "rejected} or {prompt|messages, responses, ranking}) or 'demo'")
    g.add_argument("--prompts", help="GRPO: JSONL of {\"prompt\"} or {\"messages\"}, or 'demo'")
    g.add_argument("--val-prompts", help="held-out prompts whose greedy answers are scored "
                                          "by --reward at each evaluation, or 'demo'")
    g.add_argument("--reward", help="rm:CHECKPOINT_DIR (a trained reward model) or "
                                    "python:module:function (function(prompts, responses) "
                                    "-> list of floats)")
    g.add_argument("--beta", type=float, help="DPO/IPO temperature")
    g.add_argument("--ipo", action="store_true", default=None, help="the IPO loss instead of DPO")
    g.add_argument("--group-size", type=int, help="GRPO answers sampled per prompt")
    g.add_argument("--max-new-tokens", type=int, help="GRPO: longest sampled answer")
    g.add_argument("--clip-eps", type=float, help="GRPO: PPO ratio clipping")
    g.add_argument("--kl-coef", type=float, help="GRPO: weight of the KL penalty to the reference")
    g.add_argument("--updates-per-rollout", type=int,
                   help="GRPO: optimizer updates on each batch of samples")
    g.add_argument("--max-len", type=int, help="RM/DPO: most tokens of prompt + answer")
    g.add_argument("--val-fraction", type=float, help="fraction of prompts held out")
    g.add_argument("--bitwise-logprobs", action="store_true", default=None,
                   help="GRPO: rollouts and recomputation through batch-invariant ops, so the "
                        "engine's log-probs equal the trainer's bit for bit (slower)")
    g.add_argument("--train-layers", type=int,
                   help="train only the last N transformer blocks and the final norm "
                        "(and the reward head)")


def config_from_args(args: argparse.Namespace):
    """The :class:`TrainConfig` the parsed arguments describe."""
    from llm_engine.training.trainer import TrainConfig

    overrides = {
        name: getattr(args, name, None)
        for name in ("data", "steps", "batch_size", "grad_accum", "seq_len", "lr",
                     "min_lr_ratio", "warmup_steps", "weight_decay", "grad_clip", "eval_every",
                     "eval_examples", "ckpt_every", "log_every", "seed", "vocab_size",
                     "tokenizer", "init_from", "stdlib_max_bytes", "device", "compile",
                     "gradient_checkpointing", "fused_loss", "autocast", "num_samples",
                     "progress", "resume")
    }
    method = getattr(args, "method", None)
    preset = args.preset or (f"smollm2-{method}" if method else "tiny")
    overrides["out_dir"] = args.out or f"runs/{preset}"
    if args.model_config is not None:
        overrides["model_overrides"] = args.model_config
    if method or PRESETS[preset].method:
        from llm_engine.training.alignment import AlignConfig

        for name in ("method", "prompts", "val_prompts", "reward", "beta", "ipo", "group_size",
                     "max_new_tokens", "clip_eps", "kl_coef", "updates_per_rollout", "max_len",
                     "val_fraction", "train_layers", "bitwise_logprobs"):
            overrides[name] = getattr(args, name, None)
        return AlignConfig.from_preset(preset, **overrides)
    return TrainConfig.from_preset(preset, **overrides)


def handle(args: argparse.Namespace) -> int:
    """Run ``llm-engine train``; 0 on success, 130 when interrupted (checkpoint written),
    2 for a bad configuration."""
    from llm_engine.training.trainer import train

    try:
        cfg = config_from_args(args)
        if getattr(cfg, "method", None):
            return _handle_alignment(cfg)
        summary = train(cfg)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError) as e:
        print(f"llm-engine train: error: {e}", file=sys.stderr)
        return 2
    first, last = summary["first_eval"], summary["last_eval"]
    print(f"trained {summary['parameters'] / 1e6:.2f}M parameters to step {summary['step']}: "
          f"val loss {first['val_loss']:.4f} (step {first['step']}) -> {last['val_loss']:.4f} "
          f"(step {last['step']}), perplexity {last['val_ppl']:.2f}; output in "
          f"{summary['out_dir']}")
    for text in last.get("samples", []):
        print("---\n" + text)
    return 0


def _handle_alignment(cfg) -> int:
    from llm_engine.training.align import align

    summary = align(cfg)
    first, last = summary["first_eval"], summary["last_eval"]
    keys = [k for k, v in last.items() if isinstance(v, float)]
    print(f"{cfg.method}: step {first['step']} -> {last['step']}; output in {summary['out_dir']}")
    for k in keys:
        before = first.get(k)
        print(f"  {k}: {before if before is None else f'{before:.4f}'} -> {last[k]:.4f}")
    for text in last.get("samples", []):
        print("---\n" + text)
    return 0
