#!/usr/bin/env bash
# README command 2: install what the tests need, lint, type-check, check the layers, run the whole suite.
# Needs PostgreSQL on 127.0.0.1:5432 (database `test`, trust auth) and Redis on 127.0.0.1:6379,
# or TENSORQ_TEST_POSTGRES_URL / TENSORQ_TEST_REDIS_URL pointing elsewhere.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh --test
. .venv/bin/activate
export HF_HUB_OFFLINE=1
ruff check .
ruff format --check .
mypy
lint-imports  # the layers (pyproject.toml [tool.importlinter], docs/architecture.md)
pytest -q -p no:cacheprovider --durations=10 "$@"
