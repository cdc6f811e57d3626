# Two commands do all set-up on a fresh machine:
#   make demo   # create .venv, install, run the whole pipeline on the bundled extracts
#   make test   # create .venv, install, lint and run the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
ROOT ?= s2vec_data
export DAGSTER_HOME ?= $(CURDIR)/.dagster_home

.PHONY: setup demo test lint ui bench clean

setup: $(VENV)/.installed

# constraints.txt pins the CPU build of torch for this setup; the package accepts any recent
# torch, so GPU users install their CUDA build first and skip the constraints.
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	touch $@

$(DAGSTER_HOME)/dagster.yaml: dagster.yaml
	mkdir -p $(DAGSTER_HOME)
	cp dagster.yaml $@

demo: setup $(DAGSTER_HOME)/dagster.yaml
	$(BIN)/s2vec materialize --root $(ROOT)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/python -m pytest -q

ui: setup $(DAGSTER_HOME)/dagster.yaml
	S2VEC_ROOT=$(abspath $(ROOT)) $(BIN)/dagster dev -w workspace.yaml -h 127.0.0.1 -p 3000

bench: setup
	$(BIN)/python benchmarks/bench_s2.py
	$(BIN)/python benchmarks/bench_extract.py
	$(BIN)/python benchmarks/bench_data_layer.py

clean:
	rm -rf $(ROOT) $(DAGSTER_HOME)
