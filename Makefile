# Two commands on a fresh machine: `make demo` and `make test`.
# Both create (or reuse) the virtualenv in $(VENV) and install what they need.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEPS := $(VENV)/.fastnig-deps
# torch is pinned: these machines hold the 2.13.0 CPU wheel locally, while an
# unpinned requirement would pull a multi-GB CUDA build.
TORCH ?= torch==2.13.0

.PHONY: install check-wheel test test-fast lint demo bench bench-explorer browser clean

$(DEPS): pyproject.toml Makefile
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q "$(TORCH)" -e ".[ir,demo,test]"
	@touch $@

# Build and install the package itself, editable: the compiled extension goes
# to the venv's site-packages and `import fastnig` finds the sources of this
# checkout with it, from the repository root as from anywhere else.  Python
# changes apply at once; a change under csrc/ or to CMakeLists.txt rebuilds.  A plain
# `pip install .` is built and smoke-tested by `make check-wheel` (CI runs both).
BUILT := $(VENV)/.fastnig-built
$(BUILT): $(DEPS) CMakeLists.txt $(shell find csrc -type f)
	$(BIN)/python -m pip install -q --no-deps --force-reinstall -e .
	@touch $@

install: $(BUILT)

# A plain (non-editable) wheel, installed into a scratch folder and imported
# from a neutral folder: the compiled extension and the package data
# (collections, configs, reference numbers) must come from the wheel alone.
check-wheel: $(DEPS)
	@rm -rf build/check-wheel && mkdir -p build/check-wheel/wheels build/check-wheel/target build/check-wheel/cwd
	$(BIN)/python -m pip wheel -q --no-deps -w build/check-wheel/wheels .
	$(BIN)/python -m pip install -q --no-deps --target build/check-wheel/target build/check-wheel/wheels/fastnig-*.whl
	cd build/check-wheel/cwd && PYTHONPATH=$(CURDIR)/build/check-wheel/target $(CURDIR)/$(BIN)/python $(CURDIR)/.ci/wheel_smoke.py $(CURDIR)/build/check-wheel/target

# Headless Chromium for the browser tests (tests/test_browser.py: the explorer and the report as a browser
# shows them): Debian's package, installed once (as root, or with sudo) and never downloaded by a tool.
# Without it the browser tests skip locally and fail under CI (CI=true).
CHROMIUM := $(VENV)/.fastnig-chromium
$(CHROMIUM):
	@mkdir -p $(VENV)
	@if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; \
	elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then \
		sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; \
	else echo "note: no Chromium and no root to install it (apt-get install chromium): the browser tests will skip" \
		"(and fail under CI)"; exit 0; fi
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 && touch $@ || true

browser: $(CHROMIUM)

# Everything (~15 min on 2 cores), and the fast lane: in-process tests only, the layer contract and
# ruff included (under a minute once installed).
test: install $(CHROMIUM)
	$(BIN)/pytest -q tests

test-fast: install
	$(BIN)/pytest -q -m "not slow" tests

lint: install
	$(BIN)/ruff check fastnig tests bench
	$(BIN)/lint-imports

demo: install
	$(BIN)/fastnig demo

bench: install
	$(BIN)/python bench/throughput/bench_attribute.py

# the explorer's size and time-to-interactive budgets (docs/explorer.md)
bench-explorer: install $(CHROMIUM)
	$(BIN)/python bench/explorer/bench_explorer.py

clean:
	rm -rf build $(VENV) .pytest_cache
