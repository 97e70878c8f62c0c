# The two commands of the README: `make sim` (the dry run) and `make test` (the suite).
SHELL := /bin/bash
VENV := .venv
export HF_HUB_OFFLINE := 1
export SVT_LOG := 1
export FLWR_TELEMETRY_ENABLED := 0
# Many torch processes share the cores here (tests in parallel, a coordinator and robots in `make sim`):
# OpenMP threads that spin while they wait took the CPU from the others (BENCHMARKS.md, Test suite).
export OMP_WAIT_POLICY := PASSIVE

.PHONY: sim test lint setup bench
sim: setup
	$(VENV)/bin/fedbot sim $(ARGS)

# Tests run in TEST_WORKERS processes (pytest-xdist): many wait on Flower processes, not the CPU.
TEST_WORKERS ?= 3
test: setup lint
	$(VENV)/bin/python -m pytest -n $(TEST_WORKERS) --dist worksteal --durations=12 $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml uv.lock scripts/setup.sh
	bash scripts/setup.sh
	touch $@
