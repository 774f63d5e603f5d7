# `make test` is the one test command (README, CI). It builds .venv on first use: torch and torchvision pinned
# together first (spandrel, the face-restoration and upscaler loader, needs torchvision, and a torchvision that
# does not match torch fails to import), then this project with its node-pack and dev extras. 2.14.1/0.29.1 are
# the versions the real-ComfyUI suite runs with; pip takes them from a local wheel cache where one is set up.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.14.1
TORCHVISION_VERSION ?= 0.29.1

.PHONY: test lint setup integration catalogue

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "torch==$(TORCH_VERSION)" "torchvision==$(TORCHVISION_VERSION)"
	$(PY) -m pip install --quiet -e ".[nodes,faces,dev]"
	touch $@

setup: $(VENV)/.installed

# One worker per core plus one (pytest-xdist): about a third of the driver tests' time is spent waiting on loopback
# servers, and the extra worker fills those gaps (2 cores: 6 min 04 s with -n auto, 4 min 52 s with 3 workers).
# worksteal hands queued tests to whichever worker is free, so one slow test does not leave a core idle at the end.
TEST_WORKERS ?= $(shell echo $$(( $$(nproc) + 1 )))
test: $(VENV)/.installed
	$(PY) -m pytest -n $(TEST_WORKERS) --dist worksteal

# mypy reads pyproject's [tool.mypy]; it finds charforge.driver and charforge.recipes through the links made here.
# ruff (lint rules and the formatter, in check mode), vermin (nothing needs a Python newer than requires-python),
# then mypy. CI (.ci/run) runs it before the tests.
lint: $(VENV)/.installed
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check . && $(VENV)/bin/vermin --target=3.10- --violations --no-tips --quiet $$(git ls-files '*.py')
	mkdir -p build/mypy/charforge && ln -sfn ../../../driver build/mypy/charforge/driver \
		&& ln -sfn ../../../recipes build/mypy/charforge/recipes
	$(VENV)/bin/mypy

# The real-ComfyUI suite: COMFYUI_DIR=/path/to/ComfyUI [COMFYUI_PYTHON=...] make integration
integration: $(VENV)/.installed
	$(PY) -m pytest -m comfyui tests/integration -v

catalogue: $(VENV)/.installed
	$(PY) -m charforge.catalogue --write README.md

# The README's first command: builds .venv if needed, then runs the end-to-end pipeline on the shipped sample
# drawings into $(DEMO_OUT). It finds ComfyUI on 127.0.0.1:8188 or starts the one in $COMFYUI_DIR (see
# docs/pipeline.md); without base models it uses tiny random ones and says so.
DEMO_OUT ?= out
.PHONY: demo
demo: $(VENV)/.installed
	$(VENV)/bin/charforge pipeline samples/character --out "$(DEMO_OUT)" --character pip --class "cartoon boy" --no-face-check
