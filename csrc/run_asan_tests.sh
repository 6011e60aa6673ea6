#!/usr/bin/env bash
# Runs the tests of the C++ code (KV-cache manager, CPU kernels) against a build of
# llm_engine._C with AddressSanitizer + UndefinedBehaviorSanitizer (LLM_ENGINE_SANITIZE=1).
#
# The sanitized extension is built in a temporary directory and never touches
# the normal in-place llm_engine/_C*.so: the pure-Python parts of the package
# are copied next to it and that copy comes first on PYTHONPATH (the editable
# install's finder only answers after sys.path), so `import llm_engine._C`
# resolves to the sanitized build. The tests run from a copy too, so the
# source tree is not on sys.path. Python itself is not instrumented, hence
# LD_PRELOAD of the sanitizer runtimes and detect_leaks=0 (the interpreter's
# own allocations at exit are not ours to report).
#
# Usage: bash csrc/run_asan_tests.sh [extra pytest args]   (or: make test-asan)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/llm_engine_asan.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

cd "$ROOT"
echo "building sanitized llm_engine._C in $WORK"
LLM_ENGINE_SANITIZE=1 "$PY" setup.py -q build_ext \
  --build-temp "$WORK/build" --build-lib "$WORK/lib" >"$WORK/build.log" 2>&1 \
  || { cat "$WORK/build.log"; exit 1; }

mkdir -p "$WORK/pkg" "$WORK/tests"
cp -r llm_engine "$WORK/pkg/llm_engine"
find "$WORK/pkg" -name '_C*.so' -delete
find "$WORK/pkg" -name '__pycache__' -prune -exec rm -rf {} +
cp "$WORK"/lib/llm_engine/_C*.so "$WORK/pkg/llm_engine/"
cp tests/test_block_manager.py tests/test_block_manager_property.py tests/test_cpu_attention.py \
  tests/test_cpu_layer_ops.py tests/test_quant.py tests/test_quant_int8.py \
  tests/testing_utils.py "$WORK/tests/"

ASAN_RT="$(gcc -print-file-name=libasan.so)"
UBSAN_RT="$(gcc -print-file-name=libubsan.so)"
export LD_PRELOAD="$ASAN_RT:$UBSAN_RT"
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:strict_string_checks=1"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"
export PYTHONPATH="$WORK/pkg"

cd "$WORK"
"$PY" - "$WORK" <<'EOF'
import sys
import llm_engine._C as C
assert C.__file__.startswith(sys.argv[1]), f"not the sanitized build: {C.__file__}"
with open(C.__file__, "rb") as f:
    assert b"__asan_" in f.read(), "the extension was built without AddressSanitizer"
print(f"using {C.__file__}")
EOF
"$PY" -m pytest -q -p no:cacheprovider tests "$@"
