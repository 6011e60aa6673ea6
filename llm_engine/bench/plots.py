"""Plots of a run, one PNG per suite: throughput against the case's size, one
line per implementation, one panel per kind of case, the device's ceiling drawn
where it applies.

Each suite's ``PlotSpec`` says which ``Row.params`` make the x axis (their
product, e.g. rows × hidden); rows lacking them are not plotted. Rows that share
every other parameter and the rest of their case name share a panel.
"""

from __future__ import annotations

import itertools
import math
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from llm_engine.bench.common import OURS, Ceilings, Row


@dataclass(frozen=True)
class PlotSpec:
    """``x_keys``: alternatives, the first whose params are all present gives x;
    ``x_labels``: ``(first key, label)`` pairs for the panels of other alternatives."""

    title: str
    x_label: str
    x_keys: tuple[tuple[str, ...], ...]
    log2_x: bool = True
    # The x label of panels whose x comes from the key set starting with this key.
    x_labels: tuple[tuple[str, str], ...] = ()


PLOT_SPECS: dict[str, PlotSpec] = {
    "attention": PlotSpec("Fused attention", "sequence length (tokens)",
                          (("seqlen",), ("seqlen_q",), ("seq_len",))),
    "layer_norm": PlotSpec("LayerNorm / RMSNorm", "size: rows × hidden (elements)",
                           (("rows", "hidden"), ("numel",))),
    "sampling": PlotSpec("Softmax sampling", "vocabulary size (logits per row)",
                         (("vocab",), ("vocab_size",))),
    "paged_attention": PlotSpec("Paged decode attention", "context length (tokens)",
                                (("context",), ("context_len",), ("seqlen",))),
    "linear": PlotSpec("Linear layers", "rows (tokens)", (("rows",),)),
    "cpu_layer_ops": PlotSpec("CPU layer ops", "rows (tokens)", (("rows",),)),
    "generate": PlotSpec("Generation", "batch size (sequences)",
                         (("batch",), ("batch_size",), ("streams",), ("prompt_len",)),
                         x_labels=(("streams", "concurrent streams"),
                                   ("prompt_len", "prompt length (tokens)"))),
    "serve": PlotSpec("Serving (OpenAI API, streaming)", "concurrent clients",
                      (("concurrency",),)),
}

_CEILING_LABELS = {"GB/s": "copy bandwidth", "TFLOP/s": "matmul peak"}


def write_plots(rows: list[Row], suites: list[str], ceilings: Ceilings | None,
                out_dir: Path) -> dict[str, Path]:
    """Draw ``<suite>.png`` in ``out_dir`` for each of ``suites`` that has a plot
    spec and plottable rows; return suite → path. Needs matplotlib."""
    written: dict[str, Path] = {}
    for suite in suites:
        spec = PLOT_SPECS.get(suite)
        if spec is None:
            continue
        panels = _suite_panels([r for r in rows if r.suite == suite], spec)
        if panels:
            path = out_dir / f"{suite}.png"
            _draw(spec, panels, ceilings, path)
            written[suite] = path
    return written


def _x_of(params: dict, spec: PlotSpec) -> tuple[float, tuple[str, ...]] | None:
    for keys in spec.x_keys:
        if all(isinstance(params.get(k), (int, float)) for k in keys):
            return float(math.prod(params[k] for k in keys)), keys
    return None


_SLOT = "\x00"


def _templates(case: str, numbers: list[float]) -> list[str]:
    """The case name with each x value's spelling (``T=4096``, ``4096x1024``,
    ``v128k``) replaced by a slot: one candidate per way to place the slots,
    since a value can appear more than once (``fwd d=64 T=64``, ``smollm2 batch=2``)."""
    placements = []
    for n in numbers:
        spellings = [f"{n:g}"]
        if n == int(n) and int(n) % 1024 == 0:
            spellings += [f"{int(n) // 1024}k", f"{int(n) // 1024}K"]
        pattern = rf"(?<![\d.])({'|'.join(map(re.escape, spellings))})(?![\d.])"
        placements.append([m.span() for m in re.finditer(pattern, case)] or [None])
    out = []
    for choice in itertools.product(*placements):
        spans = sorted(span for span in choice if span is not None)
        if any(prev[1] > nxt[0] for prev, nxt in zip(spans, spans[1:], strict=False)):
            continue
        text = case
        for start, end in reversed(spans):
            text = text[:start] + _SLOT + text[end:]
        out.append(text)
    return out or [case]


def _title(template: str) -> str:
    """A panel title: the template without the words holding a slot."""
    return " ".join(w for w in template.split() if _SLOT not in w).strip(" ,;")


def _panels(rows: list[Row], spec: PlotSpec, split: frozenset[str] = frozenset()
            ) -> dict[tuple, dict]:
    """panel key → {"title", "metric", "x_label", "series": impl → [(x, value)]}; the x
    params named in ``split`` also tell panels apart. Rows whose case names
    differ only in the x value share a panel: of a row's candidate templates,
    the one most rows share wins (the last placement on a tie)."""
    points = []
    for row in rows:
        if row.value is None or not math.isfinite(row.value):
            continue
        found = _x_of(row.params, spec)
        if found is None:
            continue
        x, keys = found
        axis = tuple(k for k in keys if k not in split)
        others = tuple(sorted((k, str(v)) for k, v in row.params.items() if k not in axis))
        candidates = _templates(row.case, [float(row.params[k]) for k in keys])
        points.append((row, x, keys, (row.metric, others), candidates))
    shared = Counter((group, t) for _, _, _, group, cands in points for t in set(cands))
    panels: dict[tuple, dict] = {}
    for row, x, keys, (metric, others), candidates in points:
        template = max(reversed(candidates), key=lambda t: shared[(metric, others), t])
        label = _title(template)
        extra = [f"{k}={v}" for k, v in others if k in split]
        title = ", ".join([label, *extra]) if label else ", ".join(f"{k}={v}" for k, v in others)
        panel = panels.setdefault((metric, template, others),
                                  {"title": title or spec.title, "metric": metric, "series": {},
                                   "x_label": dict(spec.x_labels).get(keys[0], spec.x_label)})
        panel["series"].setdefault(row.impl, []).append((x, row.value))
    return panels


def _suite_panels(rows: list[Row], spec: PlotSpec) -> dict[tuple, dict]:
    """Panels of one suite. When a product x axis (rows × hidden) repeats a value
    on one line (4096 × 4096 and 16384 × 1024), the panels are split by the
    product's later factors (one panel per hidden size) instead."""
    panels = _panels(rows, spec)
    repeats = any(len({x for x, _ in points}) < len(points)
                  for panel in panels.values() for points in panel["series"].values())
    split = frozenset(k for keys in spec.x_keys for k in keys[1:])
    return _panels(rows, spec, split) if repeats and split else panels


def _fmt_size(v: float, _pos: object = None) -> str:
    for div, suffix in ((2**30, "G"), (2**20, "M"), (2**10, "k")):
        if v >= div and v % div == 0:
            return f"{v / div:g}{suffix}"
    return f"{v:g}"


def _draw(spec: PlotSpec, panels: dict[tuple, dict], ceilings: Ceilings | None,
          path: Path) -> None:
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    impls = sorted({i for p in panels.values() for i in p["series"]}, key=lambda i: (i != OURS, i))
    colors = {impl: f"C{n % 10}" for n, impl in enumerate(impls)}
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig = Figure(figsize=(5.0 * ncols, 3.6 * nrows + 1.0), layout="constrained")
    device = ceilings.device_name if ceilings else "unknown device"
    fig.suptitle(f"{spec.title} on {device}", fontsize=13, fontweight="bold")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    ordered = sorted(panels.values(), key=lambda panel: panel["title"])
    for ax, panel in zip(axes, ordered, strict=False):
        metric = panel["metric"]
        top = 0.0
        for impl, points in sorted(panel["series"].items(), key=lambda kv: impls.index(kv[0])):
            points.sort()
            xs, ys = zip(*points, strict=True)
            top = max(top, *ys)
            ours = impl == OURS
            ax.plot(xs, ys, marker="o", markersize=4 if ours else 3, linewidth=2.4 if ours else 1.3,
                    color=colors[impl], label=impl, zorder=3 if ours else 2)
        ceiling = _ceiling(metric, ceilings)
        if ceiling is not None and top >= 0.1 * ceiling:
            shown = f"{ceiling:,.0f}" if ceiling >= 10 else f"{ceiling:.3g}"  # 3,350 / 0.437
            ax.axhline(ceiling, color="0.35", linestyle="--", linewidth=1,
                       label=f"{_CEILING_LABELS[metric]} ceiling ({shown} {metric})")
        ax.set_title(panel["title"], fontsize=10)
        ax.set_xlabel(panel["x_label"])
        ax.set_ylabel(metric)
        ax.set_ylim(bottom=0)
        if spec.log2_x:
            ax.set_xscale("log", base=2)
            ax.xaxis.set_major_locator(LogLocator(base=2))
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.xaxis.set_major_formatter(FuncFormatter(_fmt_size))
        ax.grid(True, which="major", alpha=0.3)
    handles: dict[str, object] = {}
    for ax in axes[:len(panels)]:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(label, handle)
    fig.legend(list(handles.values()), list(handles), loc="outside lower center",
               ncol=min(len(handles), 5), frameon=False)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fig.savefig(tmp, format="png", dpi=110)
    os.replace(tmp, path)


def _ceiling(metric: str, ceilings: Ceilings | None) -> float | None:
    if ceilings is None:
        return None
    if metric == "GB/s":
        return ceilings.bandwidth_gbps
    if metric == "TFLOP/s":
        return ceilings.matmul_tflops
    return None
