"""Softmax sampling with top-k / top-p / min-p: rows (tokens) sampled per second.

Cases on CUDA: batch {1, 32, 256} × vocab {32000, 49152, 128256, 256000} ×
filters {top-k 50, top-p 0.9, top-k 50 + top-p 0.9, min-p 0.05}, temperature
0.8, fp32 logits drawn as ``3 · randn`` (a spread like an LLM's: top-p 0.9
keeps hundreds to thousands of tokens, top-k 50 a few dozen). Implementations:

- ``llm_engine``: ``sample`` (multi-pivot threshold search, no sort);
- ``torch sort``: the sort-based reference's math (``filtered_probs_reference``
  without its argument and NaN checks: sort, softmax, cumsum, masks) then one
  batched ``torch.multinomial``;
- ``torch multinomial``: ``torch.multinomial(softmax(logits / T))`` with no
  filtering at all, the floor of what sampling costs in eager PyTorch;
- FlashInfer's sampling functions (``top_k_sampling_from_probs``,
  ``top_p_sampling_from_probs``, ``top_k_top_p_sampling_from_logits``,
  ``min_p_sampling_from_probs``) when ``flashinfer`` imports; a row with a note
  otherwise. FlashInfer's ``*_from_probs`` functions are timed with the softmax
  that produces their input.

``value`` is rows/s; the note gives GB/s of logits read (batch × vocab × 4 bytes
per call), and ``ceiling_frac`` is that over the device's copy bandwidth.

``rel_err`` for sampling is ``1 − (fraction of sampled tokens that lie in the
reference's kept set)``: 0 means every token is one the filters allow; the
unfiltered ``torch multinomial`` shows how often ignoring the filters leaves
the set. On CPU (quick, tiny shapes) ``llm_engine`` is the kernel under the
interpreter when ``TRITON_INTERPRET=1``, else the engine's CPU path
(``sample_reference``); either way not a speed figure for the kernel.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from llm_engine.bench.common import INTERPRETER_NOTE, OURS, Ceilings, Row, time_ms
from llm_engine.kernels._utils import interpreting
from llm_engine.kernels.sampling import (
    _filtered_probs,
    _validate,
    filtered_probs_reference,
    sample,
    sample_reference,
)

SUITE = "sampling"
TEMPERATURE = 0.8
LOGIT_SCALE = 3.0
FILTERS: dict[str, dict] = {
    "top_k": {"top_k": 50},
    "top_p": {"top_p": 0.9},
    "top_k+top_p": {"top_k": 50, "top_p": 0.9},
    "min_p": {"min_p": 0.05},
}


def _cases(device: str, quick: bool) -> list[tuple[int, int]]:
    """(batch, vocab) pairs."""
    if torch.device(device).type != "cuda":
        return [(1, 500), (8, 1000)] if quick else [(1, 4096), (32, 4096)]
    if quick:
        return [(1, 128256), (32, 49152), (256, 128256)]
    return [(b, v) for b in (1, 32, 256) for v in (32000, 49152, 128256, 256000)]


def make_logits(batch: int, vocab: int, device: str, seed: int = 0) -> torch.Tensor:
    g = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(batch, vocab, device=device, generator=g) * LOGIT_SCALE


def _torch_sort(logits: torch.Tensor, kw: dict) -> Callable[[], torch.Tensor]:
    """The reference's math (arguments checked once, outside the timed call)."""
    params = _validate(logits, TEMPERATURE, kw.get("top_k"), kw.get("top_p"), kw.get("min_p"),
                       0, 0, scan_logits=False)
    return lambda: torch.multinomial(_filtered_probs(logits, params), 1)[:, 0]


def _torch_multinomial(logits: torch.Tensor) -> torch.Tensor:
    return torch.multinomial(torch.softmax(logits / TEMPERATURE, dim=-1), 1)[:, 0]


def _flashinfer() -> tuple[object | None, str]:
    try:
        import flashinfer.sampling as fs
    except ImportError as e:
        return None, f"flashinfer not installed ({e})"
    return fs, ""


def _flashinfer_fn(fs, logits: torch.Tensor, kw: dict) -> Callable[[], torch.Tensor]:
    def probs() -> torch.Tensor:
        return torch.softmax(logits / TEMPERATURE, dim=-1)

    if "top_k" in kw and "top_p" in kw:
        return lambda: fs.top_k_top_p_sampling_from_logits(logits / TEMPERATURE, kw["top_k"],
                                                           kw["top_p"])
    if "top_k" in kw:
        return lambda: fs.top_k_sampling_from_probs(probs(), kw["top_k"])
    if "top_p" in kw:
        return lambda: fs.top_p_sampling_from_probs(probs(), kw["top_p"])
    return lambda: fs.min_p_sampling_from_probs(probs(), kw["min_p"])


def outside_fraction(tokens: torch.Tensor, kept: torch.Tensor) -> float:
    """``1 − fraction of tokens inside kept: (batch, vocab) bool``."""
    inside = kept.gather(1, tokens.long().view(-1, 1))
    return 1.0 - inside.float().mean().item()


def iter_rows(device: str, quick: bool, ceilings: Ceilings) -> Iterator[Row]:
    cuda = torch.device(device).type == "cuda"
    fs, fs_note = _flashinfer() if cuda else (None, "flashinfer needs CUDA")
    for batch, vocab in _cases(device, quick):
        logits = make_logits(batch, vocab, device)
        nbytes = logits.numel() * logits.element_size()
        for name, kw in FILTERS.items():
            case = f"{name} b{batch} v{vocab}"
            params = {"batch": batch, "vocab": vocab}
            kept = filtered_probs_reference(logits, TEMPERATURE, **kw) > 0

            def row(impl: str, fn: Callable[[], torch.Tensor], note: str = "",
                    case=case, params=params, kept=kept, nbytes=nbytes, batch=batch) -> Row:
                ms = time_ms(fn, device, quick=quick)
                gbps = nbytes / (ms * 1e-3) / 1e9
                return Row(SUITE, case, impl, "rows/s", batch / (ms * 1e-3), ms=ms,
                           ceiling_frac=gbps / ceilings.bandwidth_gbps,
                           rel_err=outside_fraction(fn(), kept), params=params,
                           note=f"{gbps:.1f} GB/s of logits; rel_err = 1 - fraction in kept set"
                                + (f"; {note}" if note else ""))

            if cuda or interpreting():
                ours = lambda lg=logits, kw=kw: sample(lg, TEMPERATURE, seed=0, **kw)
                note = INTERPRETER_NOTE if not cuda else ""
            else:
                ours = lambda lg=logits, kw=kw: sample_reference(lg, TEMPERATURE, seed=0, **kw)
                note = "CPU: the engine's PyTorch path (sample_reference), not the kernel"
            yield row(OURS, ours, note)
            yield row("torch sort", _torch_sort(logits, kw),
                      "sort + softmax + cumsum + masks + multinomial")
            yield row("torch multinomial", lambda lg=logits: _torch_multinomial(lg),
                      "unfiltered: multinomial(softmax), ignores the filters")
            if fs is None:
                yield Row(SUITE, case, "flashinfer", "rows/s", None, params=params, note=fs_note)
            else:
                yield row("flashinfer", _flashinfer_fn(fs, logits, kw),
                          "flashinfer.sampling (rejection sampling, no sort)")


def run(device: str, quick: bool, ceilings: Ceilings) -> list[Row]:
    """Rows for every case and implementation (see the module docstring)."""
    return list(iter_rows(device, quick, ceilings))
