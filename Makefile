# Two commands do all set-up on a fresh machine:
#   make demo   # create .venv, install, run the whole pipeline on the bundled extracts
#   make test   # create .venv, install, lint and run the test suite (what CI runs)
#   make test-fast   # the tests not marked slow: under 3 minutes on 2 cores
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
ROOT ?= s2vec_data
# Folder of OSM change files the UI's refresh (nightly_refresh, refresh_sources) applies:
# make ui CHANGES=DIR (default: an exported S2VEC_CHANGES).
CHANGES ?= $(S2VEC_CHANGES)
PORT ?= 3000
# The demo's and the UI's Dagster instance. Only demo and ui use it: tests never touch it.
DEMO_HOME ?= $(CURDIR)/.dagster_home

.PHONY: setup demo test test-fast test-tools lint ui bench clean

setup: $(VENV)/.installed

# constraints.txt pins torch 2.13.0 (on Linux x86_64 PyPI serves its CUDA build; the README says
# how to get the CPU build). The package accepts any recent torch: a build installed first stays.
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	touch $@

# The repo's settings plus the pooled SQLite storages at this home (instance.py says why).
$(DEMO_HOME)/dagster.yaml: dagster.yaml $(VENV)/.installed
	mkdir -p $(DEMO_HOME)
	cp dagster.yaml $@.tmp
	$(BIN)/python -c "from s2vec_pipeline.service.instance import pooled_sqlite_config as c; \
	  print(c('$(DEMO_HOME)'), end='')" >> $@.tmp
	mv $@.tmp $@

demo: setup $(DEMO_HOME)/dagster.yaml
	DAGSTER_HOME=$(DEMO_HOME) $(BIN)/s2vec materialize --root $(ROOT)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Tests run in a shuffled order (pytest-randomly): each must pass alone and in any order. CI
# uses one fixed seed, so a run is reproducible; TEST_ORDER=<another number> shuffles anew.
TEST_ORDER ?= 20261129
PYTEST := env -u DAGSTER_HOME $(BIN)/python -m pytest -q -p randomly --randomly-seed=$(TEST_ORDER)
test: lint test-tools
	$(PYTEST)

# The fast tier: every module's unit tests, without the tests marked slow (end to end: Dagster
# runs on the bundled extracts, PostgreSQL, servers, CLIs in subprocesses, training).
test-fast: setup test-tools
	$(PYTEST) -m "not slow"

# The system tools the tests run (PostgreSQL server, osmium-tool, Chromium, Docker Compose):
# installed with apt-get where missing, else one line says what is missing and how to install it.
test-tools:
	@bash .ci/test_tools.sh

# Fails at once when PORT is taken (dagster dev would otherwise run on without a webserver).
ui: setup $(DEMO_HOME)/dagster.yaml
	@$(BIN)/python -c "import socket,sys; s=socket.socket(); s.bind(('127.0.0.1', $(PORT)))" \
	  2>/dev/null || { echo "port $(PORT) is taken: make ui PORT=NNNN"; exit 2; }
	DAGSTER_HOME=$(DEMO_HOME) S2VEC_ROOT=$(abspath $(ROOT)) \
	  S2VEC_CHANGES=$(if $(CHANGES),$(abspath $(CHANGES))) \
	  $(BIN)/dagster dev -w workspace.yaml -h 127.0.0.1 -p $(PORT)

bench: setup
	$(BIN)/python benchmarks/bench_s2.py
	$(BIN)/python benchmarks/bench_extract.py
	$(BIN)/python benchmarks/bench_data_layer.py

clean:
	rm -rf $(ROOT) $(DEMO_HOME)
