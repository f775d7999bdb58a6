# Two commands on a fresh machine: `make demo` and `make test`.
# Both create (or reuse) the virtualenv in $(VENV) and install what they need.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEPS := $(VENV)/.fastnig-deps
# torch is pinned: these machines hold the 2.13.0 CPU wheel locally, while an
# unpinned requirement would pull a multi-GB CUDA build.
TORCH ?= torch==2.13.0

.PHONY: install test demo bench clean

$(DEPS): pyproject.toml Makefile
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q "$(TORCH)" ".[ir,demo,test]"
	@touch $@

# (Re)build and install the package itself: a plain `pip install .`.
install: $(DEPS)
	$(BIN)/python -m pip install -q --no-deps --force-reinstall .

test: install
	$(BIN)/pytest -q tests

demo: install
	$(BIN)/fastnig demo

bench: install
	$(BIN)/python bench/bench_attribute.py

clean:
	rm -rf build $(VENV) .pytest_cache
