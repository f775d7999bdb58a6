# Two commands on a fresh machine: `make demo` and `make test`.
# Both create (or reuse) the virtualenv in $(VENV) and install what they need.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEPS := $(VENV)/.fastnig-deps
# torch is pinned: these machines hold the 2.13.0 CPU wheel locally, while an
# unpinned requirement would pull a multi-GB CUDA build.
TORCH ?= torch==2.13.0

.PHONY: install check-wheel test demo bench clean

$(DEPS): pyproject.toml Makefile
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q "$(TORCH)" -e ".[ir,demo,test]"
	@touch $@

# (Re)build and install the package itself, editable: the compiled extension
# goes to the venv's site-packages and `import fastnig` finds the sources of
# this checkout with it, from the repository root as from anywhere else (Python
# changes apply at once; C++/CUDA changes need `make install` again).  A plain
# `pip install .` is built and smoke-tested by `make check-wheel` (CI runs both).
install: $(DEPS)
	$(BIN)/python -m pip install -q --no-deps --force-reinstall -e .

# A plain (non-editable) wheel, installed into a scratch folder and imported
# from a neutral folder: the compiled extension and the package data
# (collections, configs, reference numbers) must come from the wheel alone.
check-wheel: $(DEPS)
	@rm -rf build/check-wheel && mkdir -p build/check-wheel/wheels build/check-wheel/target build/check-wheel/cwd
	$(BIN)/python -m pip wheel -q --no-deps -w build/check-wheel/wheels .
	$(BIN)/python -m pip install -q --no-deps --target build/check-wheel/target build/check-wheel/wheels/fastnig-*.whl
	cd build/check-wheel/cwd && PYTHONPATH=$(CURDIR)/build/check-wheel/target $(CURDIR)/$(BIN)/python $(CURDIR)/.ci/wheel_smoke.py $(CURDIR)/build/check-wheel/target

test: install
	$(BIN)/pytest -q tests

demo: install
	$(BIN)/fastnig demo

bench: install
	$(BIN)/python bench/bench_attribute.py

clean:
	rm -rf build $(VENV) .pytest_cache
