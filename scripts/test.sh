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
# With arguments, they go to pytest as they are (one file, -k, -m ...). Without, the CI suite: everything but the
# tests marked slow, spread over processes (most tests wait on real servers and workers, so three processes finish
# in about half the time on two cores), then the tests marked serial (latency bounds) alone. --all adds the slow
# tests (real models beyond the covering set, every tiny family, the image install, the GPU entry point's dry run).
if [ $# -gt 0 ] && [ "$1" != --all ]; then
    exec python -m pytest "$@"
fi
only='not slow and '
if [ "${1:-}" = --all ]; then only=''; fi
python -m pytest -n 3 -m "${only}not serial"
python -m pytest -m "${only}serial"
