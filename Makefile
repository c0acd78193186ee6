# The two commands of the README: `make demo` and `make test`. Both set up
# .venv from requirements.txt on first use (about 2 minutes, 5 GB).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: setup test test-fast demo clean

setup: $(STAMP)

$(STAMP): requirements.txt setup.py
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	DS_BUILD_OPS=0 $(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q --no-deps -e .
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

demo: $(STAMP)
	@echo "make demo: the digits recipe (train + decode on FSDD) is not built yet."

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
