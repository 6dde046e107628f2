#!/usr/bin/env bash
# README command 1: install, then run everything on this machine (SQLite + embedded Redis).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec .venv/bin/tensorq up "$@"
