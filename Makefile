# Two entry points that do all set-up on a fresh machine:
#   make demo   start a server and screen the demo clips, printing the subject results
#   make test   run the test suite (what CI runs)
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin

.PHONY: demo test test-all protos bench clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first and exactly: the CPU wheel lies on the build machines' disk
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

demo: $(BIN)/.installed
	$(BIN)/acroscreen demo

test: $(BIN)/.installed
	$(BIN)/python scripts/gen_protos.py --check
	$(BIN)/pytest

test-all: $(BIN)/.installed
	$(BIN)/pytest -m ''

protos: $(BIN)/.installed
	$(BIN)/python scripts/gen_protos.py

clean:
	rm -rf $(VENV) build *.egg-info
