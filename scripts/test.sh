#!/usr/bin/env bash
# Sets up the project and runs the whole test suite (real Redis, real Celery worker, real models).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# Lint before the tests (rule set in pyproject.toml, [tool.ruff.lint]); mypy is configured there too
# (`mypy`), but not yet a gate: see README, "Hardening".
ruff check .
python -m pytest "$@"
