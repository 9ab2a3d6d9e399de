# The Sluice worker and API image, for docker-compose.yml and production.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY sluice ./sluice
COPY streams ./streams
COPY agents ./agents
COPY schemas ./schemas
COPY storage ./storage
RUN pip install '.[s3]' && useradd --system --home /app sluice
USER sluice

# Override with `sluice api` for the HTTP API service.
CMD ["sluice", "worker"]
