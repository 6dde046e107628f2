#!/usr/bin/env bash
# Create .venv (if missing) and install tensorq with every extra into it; `--test` adds what the tests need.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
# torch first and pinned, so nothing pulls a different (CUDA) build as a dependency.
python -m pip install -q "torch==2.13.0"
# The `all` extra: server and worker on this machine (`tensorq up`); `--test` adds the test tools.
if [ "${1:-}" = "--test" ]; then
  python -m pip install -q -e ".[test]"
else
  python -m pip install -q -e ".[all]"
fi
