# Two entry points do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.tngraph-installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test install clean system-deps

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# The CPU build of torch lies on disk; install it first so nothing pulls a CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test]'
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/tngraph demo --out demo-out --force

# The dump tool draws with Graphviz and its test renders index.html in headless Chromium:
# Debian's packages, installed when missing and the machine lets us (root with apt-get).
system-deps:
	@if ! command -v dot >/dev/null || ! command -v chromium >/dev/null; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing graphviz and chromium (Debian packages)"; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends graphviz chromium) >/dev/null \
	      || echo "warning: graphviz/chromium not installed; the drawing and rendering tests will skip"; \
	  else echo "warning: graphviz/chromium missing and not root; the drawing and rendering tests will skip"; fi; \
	fi

# pytest exits 5 when it collects no tests; that is not a failure of the suite.
# One pytest-xdist worker per core (each computing on one thread): tracing and export are single-threaded.
test: $(STAMP) system-deps
	$(BIN)/python -m pytest -q -n auto --durations=25 tests; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 0; fi; exit $$rc

clean:
	rm -rf $(VENV) demo-out .pytest_cache
