"""Training checkpoints that survive interruption.

A checkpoint is a directory ``<out>/checkpoints/step_<N>/`` (N optimizer steps done):

- the model and tokenizer in the engine's own format (written by
  ``llm_engine.loader.save_pretrained``), so ``load_model(<dir>)`` loads a checkpoint;
- ``optimizer.safetensors`` + ``optimizer.json``: the optimizer's tensors and param groups;
- ``rng.safetensors``: torch CPU and CUDA generator states;
- ``trainer_state.json``: step, scheduler state, data position, Python and NumPy RNG
  states, and whatever the trainer adds (its config).

It is written into a temporary directory beside the final one, every file flushed to
disk, then renamed into place; ``latest.json`` (replaced atomically, too) names the newest
complete checkpoint. A write that fails or is killed halfway leaves at most a ``.tmp-*``
directory, which the next save removes; ``latest.json`` still names a whole checkpoint.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from llm_engine.loader import save_pretrained
from llm_engine.model import Transformer
from llm_engine.tokenizer import Tokenizer

LATEST = "latest.json"
STATE_FILE = "trainer_state.json"


def _fsync_dir_files(directory: Path) -> None:
    for path in directory.iterdir():
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())


def _write_json_atomic(path: Path, obj: Any) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split the optimizer's state dict into flat tensors and a JSON-able rest."""
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{idx}.{key}"] = value.detach().contiguous().cpu()
            else:
                scalars[f"{idx}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _optimizer_state_dict(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for name, value in [*tensors.items(), *meta["scalars"].items()]:
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def _rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    np_state = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    return tensors, {
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "python": [py_version, list(py_state), py_gauss],
    }


def _set_rng_state(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("torch_cuda_"))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[:torch.cuda.device_count()])
    kind, keys, *rest = meta["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), *rest))
    version, state, gauss = meta["python"]
    random.setstate((version, tuple(state), gauss))


def save_checkpoint(
    out_dir: str | os.PathLike,
    step: int,
    model: Transformer,
    tokenizer: Tokenizer,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    state: dict[str, Any] | None = None,
    keep_last: int = 2,
    extra_tensors: dict[str, dict[str, torch.Tensor]] | None = None,
) -> Path:
    """Write checkpoint ``step`` under ``out_dir/checkpoints`` atomically; return its path.

    ``state`` is extra JSON-able trainer state (config, data position). ``extra_tensors``
    maps file names (``"reward_head.safetensors"``) to tensors written beside the model
    in the same atomic step. Only the ``keep_last`` newest checkpoints are kept.
    """
    root = Path(out_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink()
    final = root / f"step_{step:07d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-step_{step:07d}-", dir=root))
    try:
        save_pretrained(model, tokenizer, tmp)
        opt_tensors, opt_meta = _optimizer_tensors(optimizer)
        save_file(opt_tensors, tmp / "optimizer.safetensors")
        (tmp / "optimizer.json").write_text(json.dumps(opt_meta))
        rng_tensors, rng_meta = _rng_state()
        save_file(rng_tensors, tmp / "rng.safetensors")
        for name, tensors in (extra_tensors or {}).items():
            save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp / name)
        trainer_state = {"step": step, "scheduler": scheduler.state_dict(), "rng": rng_meta,
                         **(state or {})}
        (tmp / STATE_FILE).write_text(json.dumps(trainer_state, indent=2))
        _fsync_dir_files(tmp)
        if final.exists():
            old = Path(tempfile.mkdtemp(prefix=".tmp-old-", dir=root))
            os.replace(final, old / final.name)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _write_json_atomic(root / LATEST, {"step": step, "path": final.name})
    done = sorted(p for p in root.glob("step_*") if p.is_dir())
    for old in done[:-keep_last] if keep_last > 0 else []:
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(out_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint under ``out_dir/checkpoints``, or None."""
    root = Path(out_dir) / "checkpoints"
    latest = root / LATEST
    if not latest.is_file():
        return None
    path = root / json.loads(latest.read_text())["path"]
    return path if (path / STATE_FILE).is_file() else None


def load_checkpoint(
    path: str | os.PathLike,
    model: Transformer,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    restore_rng: bool = True,
) -> dict[str, Any]:
    """Restore model, optimizer, scheduler and RNG states from ``path``; return the trainer
    state (``step``, data position, saved config)."""
    path = Path(path)
    weights = load_file(path / "model.safetensors")
    device = next(model.parameters()).device
    missing, unexpected = model.load_state_dict(
        {k: v.to(device) for k, v in weights.items()}, strict=False)
    tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise ValueError(f"checkpoint {path} does not match the model: missing {missing}, "
                         f"unexpected {unexpected}")
    state = json.loads((path / STATE_FILE).read_text())
    if optimizer is not None:
        meta = json.loads((path / "optimizer.json").read_text())
        optimizer.load_state_dict(_optimizer_state_dict(load_file(path / "optimizer.safetensors"),
                                                        meta))
    if scheduler is not None:
        scheduler.load_state_dict(state["scheduler"])
    if restore_rng:
        _set_rng_state(load_file(path / "rng.safetensors"), state["rng"])
    return state
