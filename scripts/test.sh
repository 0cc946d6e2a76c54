#!/usr/bin/env bash
# Sets up the project and runs the whole test suite (real Redis, real Celery worker, real models).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# Lint and type-check before the tests (rule sets in pyproject.toml: [tool.ruff.lint] and [tool.mypy]).
ruff check .
mypy
python -m pytest "$@"
