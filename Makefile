# Two commands do all set-up on a fresh machine: `make run` and `make test`.
SHELL := /bin/bash
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
# The CPU torch wheel lies on this machine's disk; pip looks there too when it exists.
FIND_LINKS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels,)
PIP_INSTALL := $(BIN)/python -m pip install -q --disable-pip-version-check $(FIND_LINKS) -c constraints.txt
STAMP := $(VENV)/.installed

.PHONY: install run test services bench clean

$(STAMP): pyproject.toml constraints.txt
	@command -v $(PY) >/dev/null || { echo "need $(PY)"; exit 1; }
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(PIP_INSTALL) -e '.[dev]'
	# onnx2torch without its declared torchvision (see pyproject.toml)
	$(PIP_INSTALL) --no-deps onnx2torch
	@touch $(STAMP)

install: $(STAMP)

# Embedded default: SQLite + filesystem broker + local artifacts under ./.modelpress
run: install
	$(BIN)/modelpress run

services:
	@bash scripts/services.sh

test: install services
	$(BIN)/python -m pytest -q

# The benchmarks (they append to bench/RESULTS.md); they need the bench extra and ../shared/models (the
# rows of a missing model are skipped).
bench: install
	$(PIP_INSTALL) -e '.[dev,bench]'
	$(BIN)/python bench/int8_dynamic.py
	$(BIN)/python bench/quantize.py
	$(BIN)/python bench/prune.py
	$(BIN)/python bench/distill.py
	$(BIN)/python bench/measure.py

clean:
	rm -rf $(VENV) .modelpress .pytest_cache
