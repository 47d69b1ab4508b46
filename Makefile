# Every target runs in .venv and depends on it, so `make demo` or `make test` alone works
# on a fresh machine. torch is installed first, pinned, so no dependency pulls another build.
PYTHON ?= python3
TORCH ?= 2.13.0
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.sekft-installed

BASE ?=
DATA ?=
OUT ?= runs/train
ADAPTER ?=
SCENARIOS ?=
EVAL_OUT ?= runs/eval

.PHONY: setup test test-slow lint train eval demo bench

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install torch==$(TORCH)
	$(PY) -m pip install -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

lint: $(STAMP)
	$(PY) -m ruff check sekft tests bench

train: $(STAMP)
	$(VENV)/bin/sekft-train --base "$(BASE)" --data "$(DATA)" --out "$(OUT)"

eval: $(STAMP)
	$(VENV)/bin/sekft-eval --base "$(BASE)" $(if $(ADAPTER),--adapter "$(ADAPTER)") --scenarios "$(SCENARIOS)" --out "$(EVAL_OUT)"

demo: $(STAMP)
	$(PY) -m sekft.demo

bench: $(STAMP)
	$(PY) bench/load.py
