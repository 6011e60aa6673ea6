"""Generation benchmark: our engine against HF transformers on SmolLM2 (same run, same machine).

    python benchmarks/bench_generate.py [--device cpu|cuda] [--quick] [--out out/bench_generate]

Writes report.md / report.json in ``--out`` and prints the markdown table. The same
suite runs as ``llm-engine bench generate``; see ``llm_engine/bench/generate.py``
for the cases and how each figure is computed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from llm_engine.bench.runner import run_benchmarks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (well under a minute on CPU)")
    parser.add_argument("--out", default="out/bench_generate", help="report directory")
    args = parser.parse_args(argv)
    report = run_benchmarks(["generate"], device=args.device, quick=args.quick, out_dir=args.out)
    print((Path(args.out) / "report.md").read_text())
    return 1 if any(s.status != "ok" for s in report.suites) else 0


if __name__ == "__main__":
    sys.exit(main())
