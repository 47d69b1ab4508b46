# Every target runs in .venv and depends on it, so `make demo` or `make test` alone works
# on a fresh machine. torch is installed first, pinned, so no dependency pulls another build.
PYTHON ?= python3
TORCH ?= 2.13.0
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.sekft-installed

# make train / eval default to the embedded base and the data `make data` records.
BASE ?= sekft/assets/default-base
DATA_DIR ?= data
DATA ?= $(DATA_DIR)/train.jsonl
OUT ?= runs/train
TRAIN_ARGS ?=
ADAPTER ?=
SCENARIOS ?= $(DATA_DIR)/heldout-scenarios
EVAL_OUT ?= runs/eval
EVAL_ARGS ?=
TRAIN_SEEDS ?= 40
HELDOUT_SEEDS ?= 5
# The real SmolLM2-135M-Instruct, converted from the GGUF in a wheel on the package index.
REAL_BASE ?= build/smollm2-135m-instruct

.PHONY: setup bubblewrap test test-slow lint data train eval demo base bench bench-load \
        bench-train bench-mask bench-resident bench-ddp bench-eval real-base real-smoke \
        demo-real

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install torch==$(TORCH)
	$(PY) -m pip install -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP) bubblewrap

# The eval's sandbox (and its tests) need bubblewrap: installed when we can (root with
# apt-get; a fresh image has no package lists yet), else the command to run is printed.
# Never fails: without it the sandboxed tests skip and sekft-eval says what to do.
bubblewrap:
	@if command -v bwrap >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	    { apt-get install -y -q bubblewrap || \
	      { apt-get update -q && apt-get install -y -q bubblewrap; }; }; then :; \
	else \
	    sudo=$$([ "$$(id -u)" = 0 ] || echo "sudo "); \
	    if command -v dnf >/dev/null; then cmd="$${sudo}dnf install -y bubblewrap"; \
	    else cmd="$${sudo}apt-get install -y bubblewrap"; fi; \
	    echo "sekft: bubblewrap is missing, so sandboxed evals cannot run and their tests" \
	         "skip; install it with: $$cmd"; \
	fi

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

lint: $(STAMP)
	$(PY) -m ruff check sekft tests bench scripts

# Expert trajectories of the built-in scenario suite (sandboxed: needs bubblewrap).
data: $(STAMP)
	$(PY) -m sekft.scenarios.record --split train --seeds $(TRAIN_SEEDS) --out $(DATA_DIR)/train.jsonl
	$(PY) -m sekft.scenarios.record --split heldout --seeds $(HELDOUT_SEEDS) --out $(DATA_DIR)/heldout.jsonl
	rm -rf $(DATA_DIR)/heldout-scenarios
	$(PY) -m sekft.scenarios --split heldout --seeds $(HELDOUT_SEEDS) --out $(DATA_DIR)/heldout-scenarios

train: $(STAMP)
	$(VENV)/bin/sekft-train --base "$(BASE)" --data "$(DATA)" --out "$(OUT)" $(TRAIN_ARGS)

eval: $(STAMP)
	$(VENV)/bin/sekft-eval --base "$(BASE)" $(if $(ADAPTER),--adapter "$(ADAPTER)") \
	    --scenarios "$(SCENARIOS)" --out "$(EVAL_OUT)" $(EVAL_ARGS)

demo: $(STAMP)
	$(PY) -m sekft.demo

# Download (pip, cached in $$SEKFT_CACHE or ~/.cache/sekft), verify and convert; idempotent.
real-base: $(STAMP)
	$(PY) scripts/real_base.py "$(REAL_BASE)"

# CI's smoke run on the real model: a few LoRA steps lower the loss, one eval episode.
real-smoke: real-base
	$(PY) scripts/real_smoke.py "$(REAL_BASE)"

# The demo on the real SmolLM2-135M-Instruct, with the recipes in recipes/.
demo-real: real-base
	$(PY) -m sekft.demo_real --base "$(REAL_BASE)"

# Regenerate the shipped default base from its seed (about half an hour on 2 CPU cores).
base: $(STAMP)
	$(PY) -m sekft.default_base

bench: bench-load bench-mask bench-train bench-resident bench-ddp bench-eval

bench-load: $(STAMP)
	$(PY) bench/load.py

bench-mask: $(STAMP)
	$(PY) bench/mask.py

bench-train: $(STAMP)
	$(PY) bench/train.py

bench-resident: $(STAMP)
	$(PY) bench/resident.py

bench-ddp: $(STAMP)
	$(PY) bench/ddp.py

bench-eval: $(STAMP)
	$(PY) bench/eval.py
