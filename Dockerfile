# syntax=docker/dockerfile:1
# The Sluice worker and API image (docker-compose.yml; docs/deploy.md for Kubernetes).
#
# The build stage makes a wheel of sluice-ingest (sluice/agents, sluice/storage, ... are symlinks
# to the top-level folders; the wheel holds real files) and wheels of its dependencies, with the
# `parquet` extra. The final stage installs only those: no embedded broker or PostgreSQL (the
# `embedded` extra), no tests, no build tools; it runs as an unprivileged user.
ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY sluice ./sluice
COPY agents ./agents
COPY schemas ./schemas
COPY storage ./storage
COPY streams ./streams
RUN pip wheel --wheel-dir /wheels '.[parquet,s3]'

FROM python:${PYTHON_VERSION}-slim
LABEL org.opencontainers.image.title="sluice-ingest" \
      org.opencontainers.image.description="Sluice worker and HTTP API: files, triggers and firehoses into PostgreSQL over Kafka"
ENV PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# Your importers: mount or copy modules to /app/importers and name them in SLUICE_IMPORTERS
# (importers.mymodule).
ENV PYTHONPATH=/app
# Reachable from outside the container: the API and the workers' metrics endpoint.
ENV SLUICE_API_HOST=0.0.0.0 SLUICE_METRICS_HOST=0.0.0.0
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-index --find-links /wheels 'sluice-ingest[parquet,s3]' \
    && useradd --system --uid 10001 --user-group --home-dir /var/lib/sluice --create-home sluice \
    && mkdir -p /app/importers
# Faust keeps a small state folder in the working directory: the user's own.
WORKDIR /var/lib/sluice
USER 10001:10001
EXPOSE 8000 9464
# `sluice api` for the HTTP API service.
CMD ["sluice", "worker"]
