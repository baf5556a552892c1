# The router image: `python -m router` (no torch, no model).
#   docker build -f deploy/docker/router.Dockerfile -t ringserve-router:0.1.0 .
# Not built on the project's machines (no Docker engine, no base images reachable there).
ARG BASE_IMAGE=python:3.12-slim-bookworm
FROM ${BASE_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONPATH=/app

# The router's own dependencies: the HTTP stack and metrics, not the engine's torch.
RUN pip install "starlette>=0.37" "uvicorn>=0.29" "httptools>=0.6" "uvloop>=0.19" \
        "httpx>=0.27" "msgspec>=0.18" "prometheus-client>=0.20"

WORKDIR /app
COPY router ./router

RUN useradd --create-home --uid 1000 ringserve
USER 1000
EXPOSE 8080
ENTRYPOINT ["python", "-m", "router"]
CMD ["--host=0.0.0.0", "--port=8080"]
