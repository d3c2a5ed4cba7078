# layerprune: one entry point. `make demo` and `make test` do all set-up on a fresh machine, from the lock.
#
#   make demo         set-up + the uniform-vs-unbalanced comparison on the embedded SmolLM2-135M
#   make test         set-up + cargo test + pytest + the model tests on the transformers floor
#   make test-latest  the suite in its own environment (.venv-latest) on the newest versions pyproject.toml allows
#   make lock         refresh uv.lock (and the floor's pins, tests/floor/requirements.txt) to today's releases
#
# Every Python package comes from uv.lock (hashes included): `uv sync --locked` refuses a lock that no longer matches
# pyproject.toml. uv itself is pinned, with hashes, in requirements-uv.txt.
SHELL := /bin/bash
PYTHON ?= python3
VENV := $(CURDIR)/.venv
PY := $(VENV)/bin/python
TOOLS := $(CURDIR)/.tools
UV := $(TOOLS)/bin/uv
# uv never downloads an interpreter: it uses $(PYTHON) (>= 3.11).
export UV_PYTHON_DOWNLOADS := never
export UV_PROJECT_ENVIRONMENT := $(VENV)
# WikiText-2 raw splits: ../shared/data/wikitext-2-raw when present, else LAYERPRUNE_DATA_DIR or the datasets library.
SHARED_DATA := $(abspath $(CURDIR)/../shared/data/wikitext-2-raw)
DATA_DIR ?= $(if $(wildcard $(SHARED_DATA)/test.txt),$(SHARED_DATA),$(LAYERPRUNE_DATA_DIR))
DATA_FLAG := $(if $(DATA_DIR),--data-dir $(DATA_DIR),)
DEMO_OUT ?= runs/demo
DEMO_TOKENS ?= 4096
DEMO_THREADS ?= 2
# The runs the demo shows (compare's default is every method; see docs/cli.md).
DEMO_METHODS ?= dense,uniform-obs,flap,slimgpt,unbalanced
RUST_SRC := $(shell find rust -name '*.rs') Cargo.toml Cargo.lock
EXT_STAMP := $(VENV)/.sync-stamp

# The oldest transformers pyproject.toml allows; `make floor-test` runs the model tests on it, in .venv-floor, whose
# pins (tests/floor/requirements.txt) are the lock's except for transformers and the packages its floor needs older.
FLOOR_TRANSFORMERS := 5.0.0
FLOOR_VENV := $(CURDIR)/.venv-floor
FLOOR_REQS := tests/floor/requirements.txt
FLOOR_TESTS := tests/test_families.py tests/test_pruned_io.py tests/test_pipeline.py tests/test_pruning.py \
	tests/test_layer_importance.py tests/test_group_scores.py tests/test_dependency_floor.py tests/test_plain_config.py \
	tests/test_export_gguf.py
LATEST_VENV := $(CURDIR)/.venv-latest

.PHONY: demo test setup build rust-test py-test floor-test test-latest lock bench clean

$(UV): requirements-uv.txt
	@test -x $(TOOLS)/bin/python || $(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/python -m pip install --quiet --disable-pip-version-check --require-hashes --no-deps -r requirements-uv.txt
	touch $@

# The locked environment, and the Rust extension built (release) into it by maturin, the pinned build backend.
$(EXT_STAMP): $(UV) uv.lock pyproject.toml $(RUST_SRC)
	$(UV) sync --locked --all-extras --python $(PYTHON)
	touch $@

setup: $(EXT_STAMP)
build: $(EXT_STAMP)

demo: setup
	$(VENV)/bin/layerprune compare --model smollm2-135m --ratio 0.25 --max-tokens $(DEMO_TOKENS) $(DATA_FLAG) \
		--methods $(DEMO_METHODS) --threads $(DEMO_THREADS) --out $(DEMO_OUT)

rust-test:
	cargo test --release --quiet

# --durations: the 25 slowest tests at the end of the run (CI must stay under 30 minutes)
py-test: setup
	LAYERPRUNE_TEST_DATA_DIR=$(DATA_DIR) $(PY) -m pytest -q --durations=25

$(FLOOR_VENV)/.stamp: $(UV) $(FLOOR_REQS) $(EXT_STAMP)
	@test -x $(FLOOR_VENV)/bin/python || $(UV) venv --quiet --python $(PYTHON) $(FLOOR_VENV)
	$(UV) pip sync --quiet --python $(FLOOR_VENV)/bin/python --require-hashes $(FLOOR_REQS)
	touch $@

# layerprune itself (and the extension `uv sync` built in place) comes from python/ on PYTHONPATH.
floor-test: setup $(FLOOR_VENV)/.stamp
	PYTHONPATH=$(CURDIR)/python LAYERPRUNE_EXPECT_TRANSFORMERS=$(FLOOR_TRANSFORMERS) LAYERPRUNE_TEST_DATA_DIR=$(DATA_DIR) \
		$(FLOOR_VENV)/bin/python -m pytest -q -m "not slow" -p no:cacheprovider $(FLOOR_TESTS)

test: setup rust-test py-test floor-test

# The newest releases the ranges in pyproject.toml allow, resolved today, in their own environment: a break like
# transformers 5.25's shows up here before users meet it. The locked .venv is left as it is.
test-latest: $(UV) $(EXT_STAMP)
	rm -rf $(LATEST_VENV)
	$(UV) venv --quiet --python $(PYTHON) $(LATEST_VENV)
	$(UV) pip install --quiet --python $(LATEST_VENV)/bin/python --resolution highest \
		--override tests/floor/no-llm.txt -e ".[test,bench,llamacpp,heal]" --group models --group build
	$(UV) pip list --quiet --python $(LATEST_VENV)/bin/python --format freeze \
		| grep -iE '^(torch|transformers|huggingface-hub|tokenizers|numpy|triton|torch-pruning|gguf|kernels)=='
	LAYERPRUNE_TEST_DATA_DIR=$(DATA_DIR) $(LATEST_VENV)/bin/python -m pytest -q -p no:cacheprovider

# Refresh the pins: uv.lock from pyproject.toml, then the floor's from the new lock with transformers at its floor.
lock: $(UV)
	$(UV) lock --upgrade --python $(PYTHON)
	$(UV) export --frozen --all-extras --no-hashes --no-emit-project --no-header \
		| grep -viE '^(transformers|huggingface-hub|tokenizers|kernels)==' > $(FLOOR_VENV).constraints
	@# the floor's tests run no GGUF in llama.cpp: without llama-cpp-python, a fresh machine builds llama.cpp once, not twice
	printf 'transformers==$(FLOOR_TRANSFORMERS)\nllama-cpp-python; sys_platform == "never"\n' \
		| cat - tests/floor/no-llm.txt > $(FLOOR_VENV).overrides
	$(UV) pip compile pyproject.toml --extra test --extra bench --extra heal --group models --override $(FLOOR_VENV).overrides \
		-c $(FLOOR_VENV).constraints --generate-hashes --python-platform x86_64-manylinux_2_28 --python-version 3.11 \
		--no-header --quiet -o $(FLOOR_REQS)
	rm -f $(FLOOR_VENV).constraints $(FLOOR_VENV).overrides

bench: setup
	$(PY) benches/bench_solvers.py
	$(PY) benches/bench_scoring.py
	$(PY) benches/bench_scoring_memory.py

clean:
	rm -rf target $(EXT_STAMP) $(FLOOR_VENV) $(LATEST_VENV)
