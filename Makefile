# The set-up commands of the README: `make demo` (the main job), `make test` (the suite) and
# `make test-fast` (unit tests only, a few minutes; tests/README.md).
# Each creates .venv on first use and reuses it while pyproject.toml and constraints.txt are unchanged.
PYTHON ?= python3
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
# at a time: module fixtures are built once); integration tests share one local Ray cluster, so
# they run in one process.
UNIT := $(VENV)/bin/python -m pytest -q -ra -n 2 --dist loadfile tests/unit examples

test: $(STAMP)
	$(UNIT)
	$(VENV)/bin/python -m pytest -q -ra tests/integration

test-fast: $(STAMP)
	$(UNIT)

lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .
