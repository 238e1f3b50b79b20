# One command per habit. `make smoke` and `make test` do their own set-up on a fresh machine.
# TORCH_SPEC chooses the PyTorch build. With an NVIDIA driver (nvidia-smi) the default takes the package
# index's newest build (CUDA on Linux); without one it pins the version CI tests (torch==2.13.0), which is
# also what a machine with a local CPU wheel resolves to. Any pip requirement works:
# `make smoke TORCH_SPEC="torch --index-url ..."`. VENV_FLAGS=--system-site-packages reuses a PyTorch that
# is already installed outside the virtualenv.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= $(if $(shell command -v nvidia-smi 2>/dev/null),torch>=2.6,torch==2.13.0)
VENV_FLAGS ?=
SMOKE_OUT ?= smoke
PYTEST_ARGS ?=
# 2: the one-process tests run beside the distributed ones (tests/run_suite.py); 1: one after the other.
TEST_JOBS ?= 2
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup smoke test test-fast lint format bench clean

$(STAMP): setup.py
	$(PYTHON) -m venv $(VENV_FLAGS) $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

smoke: $(STAMP)
	DS_ACCELERATOR=$${DS_ACCELERATOR:-$$($(BIN)/python -c "import torch;print('cuda' if torch.cuda.is_available() else 'cpu')")} \
		$(BIN)/pretrain smoke --out $(SMOKE_OUT)

test: $(STAMP)
	$(BIN)/python tests/run_suite.py --jobs $(TEST_JOBS) -- $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(BIN)/python tests/run_suite.py --jobs $(TEST_JOBS) --mark "not slow" -- $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy pretrain parallel data_pipeline launch

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: $(STAMP)
	$(BIN)/python bench/train_throughput.py

clean:
	rm -rf $(SMOKE_OUT) .pytest_cache .ruff_cache .mypy_cache
