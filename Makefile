# The two commands of the README: `make demo` and `make test`. Both set up
# .venv from requirements.txt on first use (about 2 minutes, 5 GB) and the speech
# synthesizers of the digits corpus (Debian packages, installed when run as root).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

DENSE ?=

.PHONY: setup tts test test-fast demo clean

setup: $(STAMP)

$(STAMP): requirements.txt setup.py
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	DS_BUILD_OPS=0 $(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q --no-deps -e .
	touch $(STAMP)

# Not fatal when they cannot be installed, unless CI=true: the recipe's tests then skip and say why
# (under CI they fail, naming what is missing; tests/helpers.py: require).
tts:
	bash examples/digits/local/install_tts.sh || { [ "$$CI" != true ] && echo "tts: not installed; the digits recipe's tests will skip" >&2; }

test: $(STAMP) tts
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

# The digits recipe (examples/digits/README.md); DENSE=1 runs the dense twin at equal active parameters.
demo: $(STAMP)
	bash examples/digits/local/install_tts.sh
	bash examples/digits/run.sh $(if $(DENSE),--dense)

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
