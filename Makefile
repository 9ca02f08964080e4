# The set-up commands of the README: `make demo` (the main job), `make test` (the suite) and
# `make test-fast` (unit tests only, a few minutes; tests/README.md).
# Each creates .venv on first use and reuses it while pyproject.toml and constraints.txt are unchanged.
PYTHON ?= python3
# Python caches each compiled module in __pycache__ (gitignored). A shell that sets
# PYTHONDONTWRITEBYTECODE (this project's CI machines do) makes every process compile the package
# from source again: the demo and the suite start about a dozen Ray processes per fit, each
# paying ~1 s of CPU for it on 2 cores.
unexport PYTHONDONTWRITEBYTECODE
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast lint

$(STAMP): pyproject.toml constraints.txt
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade "pip>=24" "setuptools<81" wheel
	$(VENV)/bin/python -m pip install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/python pipelines/finetune.py --config configs/demo.yaml

# Unit tests (and the examples' own tests) run in two pytest-xdist processes (one file per process
# at a time: module fixtures are built once), each with one torch/OpenMP thread: two processes of
# two threads each on 2 cores oversubscribe them (the unit suite measured 6 min 46 s that way,
# 2 min 02 s with one thread each). Integration tests share one local Ray cluster, so they run in
# one process (Ray sets each worker's thread count from its CPUs).
UNIT := OMP_NUM_THREADS=1 $(VENV)/bin/python -m pytest -q -ra -n 2 --dist loadfile tests/unit examples

test: $(STAMP)
	$(UNIT)
	$(VENV)/bin/python -m pytest -q -ra tests/integration

test-fast: $(STAMP)
	$(UNIT)

lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .
