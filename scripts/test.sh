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
# The documentation site in strict mode: a broken link or anchor, or a page missing from mkdocs.yml's nav, fails.
# (NO_MKDOCS_2_WARNING: the Material theme's end-of-life notice is not a build problem; the versions are pinned.)
NO_MKDOCS_2_WARNING=1 mkdocs build --strict
python -m pytest "$@"
