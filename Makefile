# The two commands of the README: `make demo` (the main job) and `make test` (every test).
# Both create .venv when missing (--system-site-packages, so a machine that already has torch and
# triton reuses them and downloads nothing), install only what is missing (torch 2.13.0 only when
# `import torch` fails; pip never picks torch), build the extension, then run.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
DEPS_STAMP := $(VENV)/.deps-ready
BUILD_STAMP := $(VENV)/.build-ready
# Optional: tests that need them are skipped without them (pip never resolves torch through these).
OPTIONAL_DEPS := transformers==5.24.0 scikit-learn==1.9.1 accelerate==1.15.0
CSRC := $(wildcard csrc/*.cpp csrc/*.cu csrc/*.h)

.PHONY: setup build test pytest cmake-test cross-test clang-test lint demo bench clean gpu-check gpu-check-dry-run

setup: $(DEPS_STAMP)

$(PY):
	$(PYTHON) -m venv --system-site-packages $(VENV)

# setuptools>=77: pyproject.toml's license is an SPDX expression (PEP 639).
$(DEPS_STAMP): $(PY) Makefile
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install torch==2.13.0
	$(PY) -c "import triton" 2>/dev/null || $(PIP) install "triton>=3.6,<4"
	$(PY) -c "import numpy, pytest, pytest_benchmark, ninja, matplotlib, wheel" 2>/dev/null || \
		$(PIP) install numpy pytest pytest-benchmark ninja matplotlib wheel
	$(PY) -c "import setuptools, sys; sys.exit(int(setuptools.__version__.split('.')[0]) < 77)" 2>/dev/null || \
		$(PIP) install "setuptools>=77"
	$(PY) -c "import transformers, sklearn, accelerate" 2>/dev/null || $(PIP) install $(OPTIONAL_DEPS) || \
		echo "note: optional packages ($(OPTIONAL_DEPS)) not installed; their tests are skipped"
	$(PIP) show megatron-core >/dev/null 2>&1 || $(PIP) install --no-deps "megatron-core==0.16.1" "packaging>=24.2" || \
		echo "note: megatron-core not installed; its tests are skipped"
	touch $@

build: $(BUILD_STAMP)

$(BUILD_STAMP): $(DEPS_STAMP) setup.py pyproject.toml $(CSRC)
	$(PIP) install --no-build-isolation --no-deps -e .
	touch $@

pytest: $(BUILD_STAMP)
	$(PY) -m pytest -q tests

# `make lint`: ruff (configured in pyproject.toml) over the Python tree and clang-format (.clang-format)
# over csrc/. Versions are pinned (as in pyproject.toml's dev extra) so a new release cannot add
# findings on its own.
RUFF_VERSION := 0.17.6
CLANG_FORMAT_VERSION := 23.1.5
RUFF := $(VENV)/bin/ruff
CLANG_FORMAT := $(VENV)/bin/clang-format

lint: $(PY)
	$(RUFF) --version 2>/dev/null | grep -qx "ruff $(RUFF_VERSION)" || $(PIP) install "ruff==$(RUFF_VERSION)"
	$(CLANG_FORMAT) --version 2>/dev/null | grep -q "version $(CLANG_FORMAT_VERSION)$$" || \
		$(PIP) install "clang-format==$(CLANG_FORMAT_VERSION)"
	$(RUFF) check .
	$(CLANG_FORMAT) --dry-run --Werror $(CSRC) $(wildcard csrc/tests/*.cpp)

cmake-test:
	cmake -S . -B cmake-build -DCMAKE_BUILD_TYPE=Release
	cmake --build cmake-build -j2
	ctest --test-dir cmake-build --output-on-failure

# `make cross-test`: the ctest built for aarch64 (g++-aarch64-linux-gnu) and run under qemu-user, so
# the portable kernel and the host logic are checked on an ARM CPU. `make clang-test`: the ctest
# built with clang++, so the AVX-512 / AVX2 / baseline variants of the CPU step are built and run
# as clang compiles them. Both install their Debian packages when missing (cmake/ensure-tools.sh) and
# are skipped with a message where that is not possible (no apt-get, not root, no network).
cross-test:
	@if sh cmake/ensure-tools.sh "make cross-test" aarch64-linux-gnu-g++=g++-aarch64-linux-gnu \
		qemu-aarch64=qemu-user; then \
		set -e; \
		cmake -S . -B cmake-build-aarch64 -DCMAKE_BUILD_TYPE=Release \
			-DCMAKE_TOOLCHAIN_FILE=cmake/aarch64-linux-gnu.toolchain.cmake; \
		cmake --build cmake-build-aarch64 -j2; \
		ctest --test-dir cmake-build-aarch64 --output-on-failure; \
	fi

clang-test:
	@if sh cmake/ensure-tools.sh "make clang-test" clang++=clang; then \
		set -e; \
		cmake -S . -B cmake-build-clang -DCMAKE_BUILD_TYPE=Release -DCMAKE_CXX_COMPILER=clang++ \
			-DSTEP_KERNELS_CUDA_CHECK=OFF; \
		cmake --build cmake-build-clang -j2; \
		ctest --test-dir cmake-build-clang --output-on-failure; \
	fi

test: cmake-test cross-test clang-test pytest gpu-check-dry-run

demo: $(BUILD_STAMP)
	$(PY) -m step_kernels.demo

bench: $(BUILD_STAMP)
	$(PY) -m bench

# `make gpu-check OUT=dir COMMIT=hash` on a GPU machine that has its own torch, triton and nvcc:
# builds the extension in place and runs the CUDA tests and the GPU benchmarks in under 8 minutes,
# offline (no .venv, no pip call that reaches for an index; see bench/gpu_check.py). Without a GPU
# it prints and checks its plan and exits 0; `make test` runs that dry run.
OUT ?= gpu-check-out
GPU_PY = $(if $(wildcard $(PY)),$(PY),$(PYTHON))

gpu-check:
	$(GPU_PY) -m bench.gpu_check --out $(OUT) $(if $(COMMIT),--commit $(COMMIT))

gpu-check-dry-run: $(BUILD_STAMP)
	$(PY) -m bench.gpu_check --dry-run

clean:
	rm -rf build cmake-build cmake-build-aarch64 cmake-build-clang *.egg-info step_kernels/_C*.so $(BUILD_STAMP)
