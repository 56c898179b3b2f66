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

# The main job on the embedded default dataset (synthetic captioned videos): synth ->
# preprocess (shipped VAE) -> a short sharded training run (2 workers: the training path) ->
# generate with the shipped demo DiT -> gallery -> eval against the training videos.
# The shipped demo DiT (weights/dit-demo: configs/train/demo.yaml, weights/README.md);
# without it (a checkout that removed it) the demo's own short run.
DEMO_DIT ?= $(if $(wildcard weights/dit-demo/model.safetensors),weights/dit-demo,$(DEMO)/run)
demo: $(STAMP)
	@echo "[demo] 1/5 synth: 24 captioned videos"
	$(VENV)/bin/tubelet synth --output $(DEMO)/videos --num-videos 24 --seed 0
	@echo "[demo] 2/5 preprocess: decode, bucket, VAE-encode into latents"
	$(VENV)/bin/tubelet preprocess --input $(DEMO)/videos --output $(DEMO)/pre
	rm -rf $(DEMO)/run
	@echo "[demo] 3/5 train: a short FSDP2 run on 2 Ray Train workers (the training path)"
	$(VENV)/bin/tubelet train --data $(DEMO)/pre/latents --output $(DEMO)/run \
	  --config configs/train/debug.yaml --workers 2 --set steps=100
	@echo "[demo] 4/5 generate with $(DEMO_DIT): 32 prompts (colour x shape x direction, none a"
	@echo "[demo]     training caption) at 16:9, 9:16, 1:1, 9 and 17 frames"
	@echo "[demo]     (the shipped model of configs/train/demo.yaml, trained on 800 videos;"
	@echo "[demo]     the 100-step run above only shows the training path)"
	$(VENV)/bin/tubelet generate --checkpoint $(DEMO_DIT) --prompts configs/prompts/demo.jsonl \
	  --output $(DEMO)/generated --steps 30
	@echo "[demo] 5/5 eval: flicker, morphing, vanishing, adherence (generated vs training videos)"
	$(VENV)/bin/tubelet eval --videos $(DEMO)/generated --reference $(DEMO)/videos \
	  --output $(DEMO)/eval
	@echo "[demo] videos:     $(DEMO)/generated/videos/"
	@echo "[demo] gallery:    $(DEMO)/generated/index.html"
	@echo "[demo] loss curve: $(DEMO)/run/loss.png"
	@echo "[demo] evaluation: $(DEMO)/eval/eval.md (table above), $(DEMO)/eval/eval.png"

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check pipeline actors models tests benchmarks

clean:
	rm -rf $(DEMO) .pytest_cache .ruff_cache
