#!/usr/bin/env bash
# Sets up the project and runs a small Hydra sweep on the built-in SmolLM2 model through the whole stack.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
hydra-ablate demo "$@"
