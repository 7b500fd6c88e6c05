# Two entry points that do all set-up on a fresh machine:
#   make demo   start a server and screen the demo clips, printing the subject results
#   make test   run the test suite (what CI runs)
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin

.PHONY: demo test test-all protos api-docs prometheus-tools bench clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first and exactly: the CPU wheel lies on the build machines' disk
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

demo: $(BIN)/.installed
	$(BIN)/acroscreen demo

test: $(BIN)/.installed prometheus-tools
	$(BIN)/python scripts/gen_protos.py --check
	$(BIN)/python scripts/gen_api_docs.py --check
	$(BIN)/pytest

# promtool and prometheus (Debian's package) for the rule checks and the scrape test; best effort:
# without root or apt those tests skip and say why.
prometheus-tools:
	@command -v promtool >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
	  && (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus) >/dev/null 2>&1; } \
	  || echo "promtool not installed: the Prometheus rule and scrape tests will skip"

test-all: $(BIN)/.installed
	$(BIN)/pytest -m ''

protos: $(BIN)/.installed
	$(BIN)/python scripts/gen_protos.py
	$(BIN)/python scripts/gen_api_docs.py

api-docs: $(BIN)/.installed
	$(BIN)/python scripts/gen_api_docs.py

clean:
	rm -rf $(VENV) build *.egg-info
