#!/usr/bin/env bash
# The GPU tests and the full benchmark on a machine with a CUDA GPU, in under ten
# minutes, leaving everything flat in OUT_DIR (at most 8 files): report.md,
# report.json, run.log (build, tests, benchmark output) and one PNG per plotted
# suite. Commit the folder under benchmarks/results/ with the device and date.
#
#   benchmarks/run_gpu.sh OUT_DIR
#
# Installs nothing: the Python on PATH (or $PYTHON) must already have torch with
# CUDA, triton, pytest, hypothesis and matplotlib. It builds the C++ extension and
# installs this checkout in editable mode without dependencies.
# LLM_ENGINE_COMMIT names the commit when the tree is a copy without .git.
set -uo pipefail

if [ $# -ne 1 ]; then
    echo "usage: $0 OUT_DIR" >&2
    exit 2
fi
cd "$(dirname "$0")/.."
mkdir -p "$1"
OUT_DIR=$(cd "$1" && pwd)
PY=${PYTHON:-python3}
LOG="$OUT_DIR/run.log"
export PYTHONUNBUFFERED=1
: >"$LOG"

say() { echo "== $(date -u +%H:%M:%S) $*" | tee -a "$LOG"; }

# Seconds: build (~40) + tests + benchmark stay under 600. A suite past its budget
# is stopped and noted in the report with the rows it measured so far.
TESTS_S=140
BUDGETS="layer_norm=55,attention=90,sampling=45,paged_attention=45,kv_manager=20,generate=55,train=40,default=40"
BENCH_S=380

say "build: pip install -e . --no-deps --no-build-isolation"
if ! "$PY" -m pip install -q -e . --no-deps --no-build-isolation >>"$LOG" 2>&1; then
    say "build failed (see above)"
    exit 1
fi
if ! "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    say "no CUDA device visible to torch: nothing to run"
    exit 1
fi
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'triton', triton.__version__, torch.cuda.get_device_name())" 2>&1 | tee -a "$LOG"

say "gpu tests (pytest -m gpu, at most ${TESTS_S}s)"
timeout --signal=INT --kill-after=15 "$TESTS_S" \
    "$PY" -m pytest -q -m gpu -p no:cacheprovider --continue-on-collection-errors tests 2>&1 | tee -a "$LOG"
tests_rc=${PIPESTATUS[0]}
say "gpu tests exit status: $tests_rc"

say "benchmark: all suites, full shapes (at most ${BENCH_S}s; budgets $BUDGETS)"
timeout --signal=INT --kill-after=20 "$BENCH_S" \
    "$PY" -m llm_engine.bench.cli bench all --device cuda --out "$OUT_DIR" \
    --budget "$BUDGETS" 2>&1 | tee -a "$LOG"
bench_rc=${PIPESTATUS[0]}
say "benchmark exit status: $bench_rc"

files=$(find "$OUT_DIR" -type f | wc -l)
say "$files files in $OUT_DIR"
if [ "$files" -gt 8 ]; then
    say "warning: more than 8 files in $OUT_DIR"
fi
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
