# velod — the two commands a newcomer needs: `make run` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
DEPS   := $(VENV)/.deps-installed
ARGS   ?=

.PHONY: run test lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# A current pip writes console scripts that do not import `re` at every start.
$(DEPS): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $@

## run: set up and start velod in the foreground with the built-in defaults (Ctrl-C stops it)
run: $(DEPS)
	$(BIN)/velod $(ARGS)

## test: set up and run the whole suite (GPU tests skip without CUDA and say so)
test: $(DEPS)
	$(BIN)/python -m pytest -q -rs

## lint: ruff over the code and the tests
lint: $(DEPS)
	$(BIN)/ruff check velod tests bench tools

## bench: the CPU benchmarks; each prints JSON (see BENCHMARKS.md)
bench: $(DEPS)
	@for b in bench/*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
