"""Training throughput: tokens/s and model FLOPs utilisation (MFU) of whole optimizer steps.

A step is what ``llm_engine.training.Trainer.train_step`` does: draw a batch of random
windows, forward, loss, backward, gradient clipping, AdamW (fused on CUDA), LR schedule.
The data are random tokens (throughput does not depend on them).

- CUDA, case ``gpt2-124m``: the ``gpt2-124m`` preset's shape (vocabulary padded to 50304),
  ``seq_len`` 1024, 16 sequences per step (8 when ``quick``), bf16 autocast.
  Implementations: ``llm_engine`` (the Triton kernels and the fused linear cross-entropy),
  ``torch`` (the same model on the plain-PyTorch ops, ``ops.use("torch")``, with
  ``F.cross_entropy`` on full logits) and ``torch.compile`` (that plain model compiled).
- CPU, case ``tiny``: the ``tiny`` preset (4096-token vocabulary, 128 tokens, 8 sequences;
  64 tokens and 4 sequences when ``quick``). Implementations: ``llm_engine`` (fused chunked
  loss) and ``plain-loss`` (``F.cross_entropy`` on full logits). Their steps alternate and
  ``ms`` is the median (a shared CPU's load then hits both alike).

``value`` is tokens/s; ``ceiling_frac`` is MFU: ``model.flops_per_token(seq_len)`` × tokens/s
over the measured matmul peak (``Ceilings.matmul_tflops``). ``rel_err`` is the relative
difference of the first step's loss from the plain path's on the same weights and batch.
``params["peak_mib"]`` is peak memory of a step: on CUDA the growth of
``torch.cuda.max_memory_allocated`` over a step after the first (beyond the weights and
optimizer state); on CPU the peak RSS growth over the first two steps (so it includes
the gradients and AdamW state, the same for every implementation), sampled in a fresh
process per implementation (Linux ``/proc``).
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

import numpy as np
import torch

from llm_engine.bench.common import OURS, Ceilings, Row, synchronize, time_ms
from llm_engine.config import ModelConfig
from llm_engine.model import Transformer
from llm_engine.training.data import TokenWindows
from llm_engine.training.presets import get_preset
from llm_engine.training.trainer import TrainConfig, Trainer

SUITE = "train"


@dataclass(frozen=True)
class _Case:
    name: str
    model: ModelConfig
    seq_len: int
    batch_size: int


@dataclass(frozen=True)
class _Impl:
    name: str
    backend: str | None  # ops.use(backend) while it runs (None: the default choice)
    fused_loss: bool
    compile: bool


def _case(device: str, quick: bool) -> _Case:
    if torch.device(device).type == "cuda":
        shape = get_preset("gpt2-124m").model.to_dict() | {"vocab_size": 50304}
        return _Case("gpt2-124m", ModelConfig.from_dict(shape), 1024, 8 if quick else 16)
    shape = get_preset("tiny").model.to_dict()
    return _Case("tiny", ModelConfig.from_dict(shape), 64 if quick else 128, 4 if quick else 8)


def _impls(device: str) -> list[_Impl]:
    if torch.device(device).type == "cuda":
        return [_Impl(OURS, None, True, False), _Impl("torch", "torch", False, False),
                _Impl("torch.compile", "torch", False, True)]
    return [_Impl(OURS, None, True, False), _Impl("plain-loss", None, False, False)]


def _backend(name: str | None) -> contextlib.AbstractContextManager:
    """The ops' global shorthand while a measurement runs (None: the default choice)."""
    from llm_engine import ops

    return ops.use(name) if name is not None else contextlib.nullcontext()


def _trainer(case: _Case, impl: _Impl, device: str) -> Trainer:
    """A trainer on random tokens; every implementation starts from the same weights."""
    cfg = TrainConfig(out_dir="unused", steps=1000, batch_size=case.batch_size,
                      seq_len=case.seq_len, lr=6e-4, warmup_steps=10, eval_every=0,
                      ckpt_every=0, num_samples=0, progress=False, fused_loss=impl.fused_loss,
                      compile=impl.compile)
    tokens = np.random.default_rng(0).integers(0, case.model.vocab_size,
                                               size=case.seq_len * 256, dtype=np.int64)
    data = TokenWindows(tokens.astype(np.uint16), case.seq_len)
    torch.manual_seed(0)
    model = Transformer(case.model)
    return Trainer(cfg, model, None, data, data, device=device)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_probe(case_json: str, impl_json: str) -> None:
    """Run in a fresh process: print the peak RSS growth (MiB) over two steps, sampled
    every 0.5 ms by a thread (torch releases the GIL inside ops)."""
    case_d = json.loads(case_json)
    case = _Case(case_d["name"], ModelConfig.from_dict(case_d["model"]), case_d["seq_len"],
                 case_d["batch_size"])
    impl = _Impl(**json.loads(impl_json))
    trainer = _trainer(case, impl, "cpu")
    gc.collect()
    base = _rss_bytes()
    peak = [base]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(0.0005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    with _backend(impl.backend):
        for _ in range(2):
            trainer.train_step()
    done.set()
    sampler.join()
    print(json.dumps({"peak_mib": (peak[0] - base) / 2**20}))


def _cpu_peak_mib(case: _Case, impl: _Impl) -> float:
    case_json = json.dumps({"name": case.name, "model": case.model.to_dict(),
                            "seq_len": case.seq_len, "batch_size": case.batch_size})
    impl_json = json.dumps(impl.__dict__)
    code = ("import sys; from llm_engine.bench.train import _peak_rss_probe; "
            "_peak_rss_probe(sys.argv[1], sys.argv[2])")
    out = subprocess.run([sys.executable, "-c", code, case_json, impl_json], check=True,
                         capture_output=True, text=True, timeout=300).stdout
    return float(json.loads(out.strip().splitlines()[-1])["peak_mib"])


def _measure_cuda(case: _Case, impl: _Impl, device: str, quick: bool
                  ) -> tuple[float, float, float]:
    """(first step's loss, ms per step, peak MiB beyond weights and optimizer state)."""
    with _backend(impl.backend):
        trainer = _trainer(case, impl, device)
        first_loss = trainer.train_step()["loss"]
        for _ in range(2 if impl.compile else 0):  # settle recompilations
            trainer.train_step()
        synchronize(device)
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        trainer.train_step()
        synchronize(device)
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        ms = time_ms(trainer.train_step, device, quick=quick)
    del trainer
    gc.collect()
    torch.cuda.empty_cache()
    return first_loss, ms, peak


def _measure_cpu(case: _Case, impls: list[_Impl], quick: bool
                 ) -> dict[str, tuple[float, float, float]]:
    """Per implementation: (first step's loss, ms per step, peak MiB). The steps of the
    implementations alternate, so load from other processes on a shared CPU hits them alike;
    ms is the median over the rounds."""
    trainers, first_loss = {}, {}
    for impl in impls:
        with _backend(impl.backend):
            trainers[impl.name] = _trainer(case, impl, "cpu")
            first_loss[impl.name] = trainers[impl.name].train_step()["loss"]
    times: dict[str, list[float]] = {impl.name: [] for impl in impls}
    for _ in range(5 if quick else 15):
        for impl in impls:
            with _backend(impl.backend):
                t0 = time.perf_counter()
                trainers[impl.name].train_step()
                times[impl.name].append((time.perf_counter() - t0) * 1e3)
    del trainers
    gc.collect()
    return {impl.name: (first_loss[impl.name], float(np.median(times[impl.name])),
                        _cpu_peak_mib(case, impl)) for impl in impls}


def run(device: str, quick: bool, ceilings: Ceilings) -> list[Row]:
    """One row per implementation; see the module docstring."""
    case = _case(device, quick)
    model = Transformer(case.model)
    flops_per_token = model.flops_per_token(case.seq_len)
    params = {"seq_len": case.seq_len, "batch_size": case.batch_size,
              "parameters": model.num_parameters()}
    del model
    tokens = case.batch_size * case.seq_len
    results: dict[str, tuple[float, float, float] | str] = {}
    if torch.device(device).type == "cuda":
        for impl in _impls(device):
            try:
                results[impl.name] = _measure_cuda(case, impl, device, quick)
            except Exception as e:  # a failing torch.compile must show as a row, not abort
                results[impl.name] = f"failed: {type(e).__name__}: {e}"[:300]
    else:
        results.update(_measure_cpu(case, _impls(device), quick))
    plain = results[_impls(device)[1].name]
    rows = []
    for impl in _impls(device):
        result = results[impl.name]
        if isinstance(result, str):
            rows.append(Row(SUITE, case.name, impl.name, "tok/s", None, note=result,
                            params=params))
            continue
        loss, ms, peak = result
        tok_s = tokens / (ms * 1e-3)
        note = ""
        if torch.device(device).type != "cuda" and impl.fused_loss:
            note = "CPU: the chunked PyTorch loss (the Triton row kernel runs on CUDA)"
        rel_err = None if isinstance(plain, str) else abs(loss - plain[0]) / abs(plain[0])
        rows.append(Row(SUITE, case.name, impl.name, "tok/s", tok_s, ms=ms,
                        ceiling_frac=flops_per_token * tok_s / (ceilings.matmul_tflops * 1e12),
                        rel_err=rel_err, note=note, params={**params, "peak_mib": round(peak, 1)}))
    return rows
