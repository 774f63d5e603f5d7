# `make test` is the one test command (README, CI). It builds .venv on first use: the CPU build of torch
# (never a multi-GB CUDA build), then this project with its node-pack and dev extras.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0

.PHONY: test lint setup integration catalogue

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "torch==$(TORCH_VERSION)"
	$(PY) -m pip install --quiet -e ".[nodes,faces,dev]"
	touch $@

setup: $(VENV)/.installed

test: $(VENV)/.installed
	$(PY) -m pytest

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .

# The real-ComfyUI suite: COMFYUI_DIR=/path/to/ComfyUI [COMFYUI_PYTHON=...] make integration
integration: $(VENV)/.installed
	$(PY) -m pytest -m comfyui tests/integration -v

catalogue: $(VENV)/.installed
	$(PY) -m charforge.catalogue --write README.md
