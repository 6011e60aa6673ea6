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
    p.add_argument("--preset", default="tiny", choices=list(PRESETS), help=f"{presets}; default tiny")
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
    overrides["out_dir"] = args.out or f"runs/{args.preset}"
    if args.model_config is not None:
        overrides["model_overrides"] = args.model_config
    return TrainConfig.from_preset(args.preset, **overrides)


def handle(args: argparse.Namespace) -> int:
    """Run ``llm-engine train``; 0 on success, 130 when interrupted (checkpoint written),
    2 for a bad configuration."""
    from llm_engine.training.trainer import train

    try:
        summary = train(config_from_args(args))
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
