#!/usr/bin/env bash
# One command for a GPU session (under 8 minutes on an H100-class card): the `gpu` tests, then the hydra-preset
# throughput of the fast engine against the hooks loop and nnsight on the same GPU, in bfloat16, on SmolLM2-135M and
# on randomly initialised 1B- and 7B-shaped Llama configs, with peak memory, written to JSON:
#   bash bench/gpu.sh [OUT_DIR]      (default bench/gpu-results; $OUT is used when set, as on the device machine)
# Needs the project installed with a CUDA build of torch (docs/operations/deployment.md) and nnsight (pip install -e ".[bench]").
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${1:-${OUT:-bench/gpu-results}}"
mkdir -p "$OUT_DIR"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
[ -x .venv/bin/python ] && . .venv/bin/activate
PROMPTS="${GPU_BENCH_PROMPTS:-100}"       # prompts per sweep (the hydra preset's 1,209 take ~10x longer)
PEER="${GPU_BENCH_PEER_ABLATIONS:-60}"     # ablations each peer runs (one forward pass each)

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT_DIR/gpu.csv"
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device visible to torch'; print(torch.__version__, torch.version.cuda)"

echo "== gpu tests"
timeout 120 python -m pytest -m gpu tests/test_gpu.py -q -p no:cacheprovider --junitxml="$OUT_DIR/gpu-tests.xml" \
    2>&1 | tail -25 | tee "$OUT_DIR/gpu-tests.txt"
status=${PIPESTATUS[0]}

for model in smollm2 llama-1b llama-7b; do
    echo "== hydra preset throughput: $model, bfloat16"
    timeout 110 python bench/bench_engines.py --device cuda --dtype bfloat16 --model "$model" --scenarios hydra \
        --prompts "$PROMPTS" --peer-ablations "$PEER" --out "$OUT_DIR/hydra-$model.json" 2>&1 | tail -30
done
python - "$OUT_DIR" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
merged = {p.stem: json.loads(p.read_text()) for p in sorted(out.glob("hydra-*.json"))}
(out / "gpu-bench.json").write_text(json.dumps(merged, indent=2))
for name, report in merged.items():
    rows = report["scenarios"]["hydra"]
    fast = rows["fast"]
    print(f"{name}: fast {fast['ablations_per_s']} abl/s, peak {fast['peak_device_mb']} MiB; "
          + ", ".join(f"{e} x{r['speedup_of_fast']}" for e, r in rows.items() if e != "fast"))
PY
exit "$status"
