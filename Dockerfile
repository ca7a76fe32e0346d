# syntax=docker/dockerfile:1
# Two images from one file, each with the torch-free contract and its own process's code only:
#   docker build --target api -t attribution-api .        FastAPI front end (contract + app): no torch, no worker code
#   docker build --target worker -t attribution-worker .  warm RQ worker (contract + worker) with torch (CUDA build
#                                                         from PyPI; --build-arg TORCH_SPEC=... to choose another)
FROM python:3.11-slim AS base
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /srv
RUN useradd --create-home --uid 10001 service && mkdir /scores && chown service /scores  # a new `scores` volume takes this owner
COPY pyproject.toml README.md ./
COPY contract contract

FROM base AS api
COPY app app
RUN pip install . && mkdir /keys && chown service /keys  # a new `keys` volume takes this owner
USER service
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2)"]
ENV ATTR_API_PROCESSES=2 PROMETHEUS_MULTIPROC_DIR=/tmp/prometheus
CMD ["sh", "-c", "rm -rf \"$PROMETHEUS_MULTIPROC_DIR\" && mkdir -p \"$PROMETHEUS_MULTIPROC_DIR\" && exec uvicorn app.main:create_app --factory --host 0.0.0.0 --port 8000 --workers \"$ATTR_API_PROCESSES\""]

FROM base AS worker
COPY worker worker
ARG TORCH_SPEC="torch==2.13.0"
RUN pip install "${TORCH_SPEC}" ".[worker]"
USER service
CMD ["python", "-m", "worker"]
