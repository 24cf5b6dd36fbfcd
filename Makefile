# Two commands do all set-up on a fresh machine: `make run` and `make test`.
SHELL := /bin/bash
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
# The CPU torch wheel lies on this machine's disk; pip looks there too when it exists.
FIND_LINKS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels,)
PIP_INSTALL := $(BIN)/python -m pip install -q --disable-pip-version-check $(FIND_LINKS) -c constraints.txt
STAMP := $(VENV)/.installed

.PHONY: install run test lint services bench clean kernels

$(STAMP): pyproject.toml constraints.txt
	@command -v $(PY) >/dev/null || { echo "need $(PY)"; exit 1; }
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(PIP_INSTALL) -e '.[dev]'
	# onnx2torch without its declared torchvision (see pyproject.toml)
	$(PIP_INSTALL) --no-deps onnx2torch
	# onnx2tf (the LiteRT target's exporter) and tf-keras without their declared dependencies: onnx2tf pins
	# tensorflow 2.19, onnx 1.19, onnxruntime 1.23 and numpy 1.26, and tf-keras asks for `tensorflow`, which would
	# install the full TensorFlow beside tensorflow-cpu; both run on the pinned tensorflow-cpu 2.21
	$(PIP_INSTALL) --no-deps onnx2tf tf-keras
	# tf2onnx installs its own test suite as a top-level `tests` package, which would shadow ours in scripts
	# run from outside the repository root
	rm -rf $(VENV)/lib/python*/site-packages/tests
	@touch $(STAMP)

install: $(STAMP)

# Embedded default: SQLite + filesystem broker + local artifacts under ./.modelpress
run: install
	$(BIN)/modelpress run

services:
	@bash scripts/services.sh

# The static checks come first and each fails the build: ruff (lint), mypy (types), import-linter (the
# architecture's import contracts); their settings are in pyproject.toml.
lint: install
	$(BIN)/ruff check app workers kernels bench
	$(BIN)/mypy
	$(BIN)/lint-imports

# The deployment files, offline: docker-compose validates docker-compose.yml (scripts/services.sh installs it with
# apt where it can; `docker compose` does as well), hadolint (the dev extra) lints both Dockerfiles. Without either
# compose this says so and fails under CI=true, where the README's test command must check it; elsewhere it skips
# the compose check.
.PHONY: docker-check
COMPOSE = $(or $(shell command -v docker-compose 2>/dev/null),$(if $(shell docker compose version 2>/dev/null),docker compose,))
docker-check: install services
	@if [ -n "$(COMPOSE)" ]; then echo "$(COMPOSE) -f docker-compose.yml config -q"; \
		$(COMPOSE) -f docker-compose.yml config -q; \
	elif [ "$$CI" = true ]; then echo "docker-check: neither docker-compose nor docker compose is installed"; exit 1; \
	else echo "docker-check: neither docker-compose nor docker compose is installed: docker-compose.yml not validated"; fi
	$(BIN)/hadolint Dockerfile Dockerfile.gpu

# pytest on two processes: most of the suite waits on real services, workers and jobs, so two at once took 9:54
# where one took 16:40 on a 2-core machine. Each process has its own session fixtures (one `modelpress run`, its
# own PostgreSQL template), and every test starts what it stops on free ports of its own.
test: install lint services docker-check
	@if [ -n "$(NVCC)" ]; then $(MAKE) --no-print-directory kernels; \
	else echo "nvcc not found: not building the CUDA kernels (kernels/ uses its PyTorch references)"; fi
	$(BIN)/python -m pytest -q -n 2 --durations=15

# The benchmarks (they append to bench/RESULTS.md); they need the bench extra and ../shared/models (the
# rows of a missing model are skipped).
bench: install
	$(PIP_INSTALL) -e '.[dev,bench]'
	$(BIN)/python bench/int8_dynamic.py
	$(BIN)/python bench/quantize.py
	$(BIN)/python bench/prune.py
	$(BIN)/python bench/distill.py
	$(BIN)/python bench/measure.py
	$(BIN)/python bench/load.py --api-workers 1,2

# The CUDA kernels (kernels/csrc) as one shared library, called through ctypes; needs only nvcc, not a GPU.
# sm_80 and sm_90 machine code plus compute_90 PTX that newer GPUs compile when they load it. One object per
# source, so an edit rebuilds only its file (every object depends on the headers).
NVCC ?= $(firstword $(shell command -v nvcc 2>/dev/null) $(wildcard /usr/local/cuda/bin/nvcc))
KERNELS_SRC := $(wildcard kernels/csrc/*.cu)
KERNELS_HDR := $(wildcard kernels/csrc/*.h kernels/csrc/*.cuh)
KERNELS_OBJ := $(patsubst kernels/csrc/%.cu,kernels/build/obj/%.o,$(KERNELS_SRC))
KERNELS_LIB := kernels/build/libmodelpress_kernels.so
NVCC_GENCODE := -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90 \
	-gencode arch=compute_90,code=compute_90
NVCC_FLAGS := -O3 -std=c++17 -Xcompiler -fPIC -Xcompiler -Wall,-Wextra -Werror all-warnings --threads 0 $(NVCC_GENCODE)

kernels: $(KERNELS_LIB)

kernels/build/obj/%.o: kernels/csrc/%.cu $(KERNELS_HDR)
	@test -n "$(NVCC)" || { echo "make kernels needs nvcc (the CUDA toolkit, 12.x or 13.x)"; exit 1; }
	@mkdir -p $(@D)
	$(NVCC) $(NVCC_FLAGS) -c $< -o $@

$(KERNELS_LIB): $(KERNELS_OBJ) kernels/csrc/exports.map
	$(NVCC) -O3 --shared -Xcompiler -fPIC $(NVCC_GENCODE) -Xlinker --version-script=kernels/csrc/exports.map \
		-o $@.tmp $(KERNELS_OBJ) && mv $@.tmp $@

# Everything claimed about NVIDIA GPUs, checked on the one this runs on (bench/gpu_check.py): the kernels built and
# tested, their bandwidth, the CUDA and TensorRT providers and engines on ../shared/models, NVML energy, one job end
# to end; rows appended to bench/RESULTS.md. Uses the venv where there is one, else the machine's python3 (a lent
# GPU machine has torch and CUDA but no venv); without a GPU it says so and exits 0.
GPU_PYTHON := $(if $(wildcard $(BIN)/python),$(BIN)/python,python3)

.PHONY: gpu-check
gpu-check:
	$(GPU_PYTHON) bench/gpu_check.py $(GPU_CHECK_ARGS)

clean:
	rm -rf $(VENV) .modelpress .pytest_cache kernels/build
