# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test test-all demo install clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# Reinstall whenever a requirements file changes.
$(STAMP): $(BIN)/python requirements.txt requirements-dev.txt
	$(BIN)/pip install -q -r requirements-dev.txt
	touch $(STAMP)

install: $(STAMP)

# Default suite: CPU, 8 simulated devices, heavy cases marked `slow` are skipped.
test: $(STAMP)
	$(BIN)/python -m pytest -q --durations=15 tests

# Everything, slow cases included.
test-all: $(STAMP)
	$(BIN)/python -m pytest -q -m "" tests

demo: $(STAMP)
	$(BIN)/python -m train.demo

clean:
	rm -rf $(VENV)
