"""Training: data pipeline, fused-loss training loop, atomic checkpoints, presets, CLI.

``from llm_engine.training import TrainConfig, train`` runs a training job;
``llm-engine train`` (or ``python -m llm_engine.training``) is its command line.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

__all__ = ["TrainConfig", "Trainer", "train"]

if TYPE_CHECKING:
    from llm_engine.training.trainer import TrainConfig, Trainer, train


def __getattr__(name: str):  # lazy: the CLI imports this package before parsing arguments
    if name in __all__:
        from llm_engine.training import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 'llm_engine.training' has no attribute {name!r}")
