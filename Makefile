# Two commands do everything on a fresh machine: `make demo` and `make test`.
# Set-up: a virtualenv in .venv; the CPU build of torch where there is no GPU (CUDA torch
# where `nvidia-smi` finds one); then this project with its test extra.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.tubelet-installed
CPU_TORCH ?= torch==2.13.0
GPU_TORCH ?= torch
DEMO ?= demo
PYTEST_ARGS ?=

.PHONY: setup demo test lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	if nvidia-smi -L >/dev/null 2>&1; then \
	  $(PY) -m pip install -q "$(GPU_TORCH)"; \
	else \
	  $(PY) -m pip install -q "$(CPU_TORCH)"; \
	fi
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

# The main job on the embedded default dataset (synthetic captioned videos).
demo: $(STAMP)
	$(VENV)/bin/tubelet synth --output $(DEMO)/videos --num-videos 24 --seed 0
	$(VENV)/bin/tubelet preprocess --input $(DEMO)/videos --output $(DEMO)/pre
	rm -rf $(DEMO)/run
	$(VENV)/bin/tubelet train --data $(DEMO)/pre/latents --output $(DEMO)/run \
	  --config configs/train/debug.yaml --workers 2

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check pipeline actors models tests benchmarks

clean:
	rm -rf $(DEMO) .pytest_cache .ruff_cache
