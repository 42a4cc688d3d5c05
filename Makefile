# Two commands do all set-up on a fresh machine: `make demo` and `make test` (`make serve` then
# serves the demo's model).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
AOT_SITE := .aot/site
AOT_STAMP := $(AOT_SITE)/.installed

.PHONY: test test-all demo serve browser install clean aot aot-deps

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# Reinstall whenever a requirements file changes.
$(STAMP): $(BIN)/python requirements.txt requirements-dev.txt
	$(BIN)/pip install -q -r requirements-dev.txt
	touch $(STAMP)

install: $(STAMP)

# The chat page's browser test drives Debian's chromium through its chromedriver (nothing is
# downloaded by the test). As root with apt (CI) they are installed here; otherwise the test skips.
browser:
	@command -v chromedriver >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium chromium-driver; \
	  else \
	    echo "note: no chromium-driver (as root: apt-get install chromium chromium-driver); the browser test will skip"; \
	  fi; }

# Default suite: CPU, 8 simulated devices, heavy cases marked `slow` are skipped. Two pytest-xdist
# workers, one test file each at a time (module fixtures stay per file): 8.4 min on 2 cores
# against 14.4 min in one process (2026-12-08).
test: $(STAMP) $(AOT_STAMP) browser
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --durations=15 tests

# Everything, slow cases included.
test-all: $(STAMP) $(AOT_STAMP) browser
	$(BIN)/python -m pytest -q -m "" tests

demo: $(STAMP)
	$(BIN)/python -m train.demo

# The demo's model behind the OpenAI-compatible API and the chat page (http://127.0.0.1:8000/);
# runs the demo first when it has not run yet. PORT=... picks another port.
PORT ?= 8000
serve: $(STAMP)
	@test -d runs/demo/stage2/final/params || $(BIN)/python -m train.demo
	$(BIN)/python -m serve --ckpt runs/demo --served-model-name demo --image-root runs/demo/data \
	  --max-new-tokens 64 --port $(PORT)

clean:
	rm -rf $(VENV)

# Compile-only backends for `python -m train.aot` (requirements-aot.txt) in .aot/site, outside the
# venv: only train.aot puts them on sys.path. Reinstalled when the pins change.
$(AOT_STAMP): $(STAMP) requirements-aot.txt
	rm -rf $(AOT_SITE)
	$(BIN)/pip install -q --no-deps --target $(AOT_SITE) -r requirements-aot.txt
	touch $(AOT_STAMP)

aot-deps: $(AOT_STAMP)

# The paper-shape table of docs/benchmarks.md ("Compiled for the target (no device)"): compiles
# every case (long: minutes each on a small host), then prints the table from docs/aot/*.json.
aot: $(AOT_STAMP)
	$(BIN)/python -m bench.aot_table
	$(BIN)/python -m bench.aot_table --render
