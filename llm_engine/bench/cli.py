"""``llm-engine bench`` and ``llm-engine profile-kernel``.

``add_bench_parsers(subparsers)`` registers both subcommands on the main CLI's
argparse subparsers; ``handle(args)`` runs the one chosen. ``python -m
llm_engine.bench.cli ...`` runs them without the main CLI.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from llm_engine.backends import add_backend_arg, apply_backend_args
from llm_engine.bench import runner
from llm_engine.bench.profile import DTYPES, KERNELS, parse_shape


def _parse_budget(text: str) -> float | dict[str, float]:
    """``"90"`` (every suite) or ``"attention=120,default=60"``."""
    try:
        if "=" not in text:
            return float(text)
        out = {}
        for item in text.split(","):
            key, value = item.split("=")
            if key != "default" and key not in runner.SUITES:
                raise ValueError(f"unknown suite {key!r}")
            out[key] = float(value)
        return out
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"bad budget {text!r}: {e}") from e


def _shape(text: str) -> tuple[int, ...]:
    try:
        return parse_shape(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from e


def add_bench_parsers(subparsers: argparse._SubParsersAction) -> None:
    """Register ``bench`` and ``profile-kernel``; both dispatch through ``handle``."""
    bench = subparsers.add_parser(
        "bench", help="benchmark the kernels and end-to-end workloads; write a report",
        description="Measure the device's ceilings, run the benchmark suites, print the "
                    "table and write report.md, report.json and plots to --out.")
    bench.add_argument("which", nargs="*", default="all", metavar="SUITE",
                       choices=list(dict.fromkeys(["all", *runner.GROUPS, *runner.SUITES])),
                       help=f"groups ({', '.join(['all', *runner.GROUPS])}) or suites "
                            f"({', '.join(runner.SUITES)}); default: all")
    bench.add_argument("--device", choices=["cuda", "cpu"], default=None,
                       help="default: cuda if available, else cpu")
    bench.add_argument("--quick", action="store_true", help="tiny shapes, short timing")
    bench.add_argument("--out", default="out/bench", metavar="DIR",
                       help="folder for the report (default: out/bench)")
    bench.add_argument("--profile", action="store_true",
                       help="also write a torch.profiler Chrome trace per suite "
                            "(trace_<suite>.json)")
    bench.add_argument("--budget", type=_parse_budget, default=None, metavar="SECONDS",
                       help="stop a suite after this many seconds (keeping its rows so far); "
                            "one number, or per suite: attention=120,default=60")
    bench.add_argument("--ab", action="append", default=[], metavar="OP=IMPL,IMPL",
                       help="generate suite: run the same generation under each named "
                            "implementation of OP in turn and report their ratio, e.g. "
                            "rms_norm=cpp,reference (repeatable)")
    add_backend_arg(bench)
    bench.set_defaults(bench_command="bench")

    names = ", ".join(f"{n} ({k.shape})" for n, k in KERNELS.items())
    prof = subparsers.add_parser(
        "profile-kernel", help="run one kernel in a loop for Nsight Compute (ncu)",
        description="Run one kernel: warm-up calls first, then --iters calls inside "
                    "cudaProfilerStart/Stop, and print the ncu command that profiles "
                    f"only those. Kernels and their --shape: {names}.")
    prof.add_argument("name", choices=list(KERNELS))
    prof.add_argument("--shape", type=_shape, required=True, help="e.g. 4096,1024")
    prof.add_argument("--dtype", choices=list(DTYPES), default=None,
                      help="default: bf16 on cuda, fp32 on cpu")
    prof.add_argument("--iters", type=int, default=20, help="profiled calls (default 20)")
    prof.add_argument("--warmup", type=int, default=5,
                      help="calls before the profiled range, autotuning included (default 5)")
    prof.add_argument("--backward", action="store_true",
                      help="forward and backward per call (layer_norm, rms_norm, attention)")
    prof.add_argument("--device", choices=["cuda", "cpu"], default=None,
                      help="default: cuda if available, else cpu")
    prof.add_argument("--backend", action="append", default=[], metavar="OP=IMPL",
                      help="the implementation of the kernel's op to run (default triton), "
                           "e.g. rms_norm=cpp; `llm-engine backends` lists them")
    prof.set_defaults(bench_command="profile-kernel")


def _device(requested: str | None) -> str:
    device = requested or runner.default_device()
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but no CUDA device is available")
    if device == "cpu":
        # Triton kernels run on CPU tensors only in the interpreter, which must be
        # chosen before the kernels are imported; TRITON_INTERPRET=0 opts out.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    return device


def handle(args: argparse.Namespace) -> int:
    """Run ``bench`` or ``profile-kernel``; return the exit status."""
    if args.bench_command == "bench":
        return _bench(args)
    return _profile_kernel(args)


def _parse_ab(items: list[str]) -> list[tuple[str, tuple[str, ...]]]:
    """``["rms_norm=cpp,reference"]`` -> ``[("rms_norm", ("cpp", "reference"))]``, checked
    against the op registry (at least two implementations each)."""
    from llm_engine import ops

    out = []
    for item in items:
        op, _, impls = item.partition("=")
        names = tuple(dict.fromkeys(n.strip() for n in impls.split(",") if n.strip()))
        if len(names) < 2:
            raise ValueError(f"--ab takes OP=IMPL,IMPL[,...] (two or more), got {item!r}")
        for n in names:
            ops.registry().validate({op.strip(): n})
        out.append((op.strip(), names))
    return out


def _bench(args: argparse.Namespace) -> int:
    device = _device(args.device)
    apply_backend_args(args.backend)
    options = {}
    if args.ab:
        if "generate" not in runner.resolve_suites(args.which):
            raise ValueError("--ab compares implementations inside the generate suite; "
                             "run `llm-engine bench generate --ab ...`")
        options["generate"] = {"ab": _parse_ab(args.ab)}
    report = runner.run_benchmarks(args.which, device=device, quick=args.quick,
                                   out_dir=args.out, profile=args.profile, budget_s=args.budget,
                                   suite_options=options)
    print(report.to_markdown())
    for path in report.files:
        print(f"wrote {path}", file=sys.stderr)
    if report.interrupted:
        return 130
    return 1 if any(s.status == "failed" for s in report.suites) else 0


def _profile_kernel(args: argparse.Namespace) -> int:
    from llm_engine.bench.profile import build_workload, ncu_command, profile_kernel

    device = _device(args.device)
    dtype = args.dtype or ("bf16" if device == "cuda" else "fp32")
    op = KERNELS[args.name].op
    chosen = {}
    for item in args.backend:
        name, _, impl = item.partition("=")
        if name.strip() != op:
            raise ValueError(f"--backend {item!r}: {args.name} runs the op {op}; "
                             f"name it as {op}=IMPL")
        chosen[op] = impl.strip()
    try:
        workload = build_workload(args.name, args.shape, DTYPES[dtype], device, args.backward,
                                  impl=chosen.get(op, "triton"))
    except (ValueError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    ms = profile_kernel(workload, device, args.iters, args.warmup)
    shape = ",".join(map(str, args.shape))
    print(f"{args.name} shape={shape} {dtype} on {device}: {args.iters} calls after "
          f"{args.warmup} warm-up, {ms:.4f} ms per call")
    if device != "cuda":
        print("(not a GPU: nothing for ncu to profile here; run the command below on a "
              "machine with CUDA)")
    print("Nsight Compute, profiling only the measured loop:")
    print("  " + ncu_command(args.name, args.shape, dtype, args.iters, args.warmup,
                             args.backward, args.backend))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llm_engine.bench.cli")
    add_bench_parsers(parser.add_subparsers(dest="command", required=True))
    return handle(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
