# Two entry points on a fresh machine: `make demo` (set up, run the main job) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
WORKDIR ?= $(HOME)/wmdd-runs/fashion_mnist_quick
FMNIST_DIR := /usr/share/datasets/fashion-mnist
TORCH_WHEELS ?= /opt/wheels

.PHONY: setup data demo test clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[test]"
	@# The torch extra (PyTorch interop tests) only where its CPU wheel lies on disk: from PyPI it is a
	@# multi-GB CUDA build. Elsewhere those tests are skipped; install it with `pip install -e ".[torch]"`.
	@if ls $(TORCH_WHEELS)/torch-2.13.0*.whl >/dev/null 2>&1; then $(BIN)/pip install -q torch==2.13.0; \
	  else echo "no local torch wheel in $(TORCH_WHEELS): PyTorch interop tests will be skipped"; fi
	touch $@

data:
	@if [ ! -f $(FMNIST_DIR)/train-images-idx3-ubyte.gz ]; then \
	  if command -v apt-get >/dev/null; then \
	    apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
	      (apt-get update -q >/dev/null && apt-get install -y -q dataset-fashion-mnist >/dev/null); \
	  else echo "Fashion-MNIST missing: install the Debian package dataset-fashion-mnist, or pass --config.data.data_dir"; exit 1; fi; \
	fi

demo: setup data
	$(BIN)/python -m wmdd_jax all --config=configs/fashion_mnist.py:quick --workdir=$(WORKDIR)
	@echo "images: $(WORKDIR)/synthetic/grid.png  results: $(WORKDIR)/eval/summary.jsonl  stage times: $(WORKDIR)/timings.json"

test: setup
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) .pytest_cache
