FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 HF_HUB_OFFLINE=1
WORKDIR /app

# torch first, pinned; on a GPU host this is the CUDA build from the package index.
RUN pip install "torch==2.13.0"
COPY pyproject.toml README.md alembic.ini ./
COPY api ./api
COPY worker ./worker
COPY tasks ./tasks
COPY db ./db
COPY migrations ./migrations
COPY tensorq ./tensorq
RUN pip install ".[all]" && useradd --create-home tensorq && mkdir -p /data/artifacts && chown tensorq /data/artifacts
USER tensorq

EXPOSE 8000 5555
CMD ["tensorq", "api", "--host", "0.0.0.0", "--port", "8000"]
