#!/usr/bin/env bash
# The device tool's command for a GPU session (bench/README.md has the exact call): runs bench/gpu_run.py on this
# machine's python3, everything (results, log, one line per test) under $OUT (bench/gpu-results when unset).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/gpu-results}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 bench/gpu_run.py --out "$OUT" "$@" 2>&1 | tee "$OUT/gpu-run.log"
exit "${PIPESTATUS[0]}"
