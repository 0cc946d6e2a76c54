#!/usr/bin/env bash
# Rehearses a GPU session on this CPU, so that the GPU's few minutes can fail only for reasons only a GPU shows:
#
#   python bench/gpu_prepare.py && bash bench/gpu_dry_run.sh
#
# 1. a stand-in for the GPU machine's python3: a CPython 3.12 virtual environment with torch 2.11 and transformers
#    5.17 (PyPI's torch 2.11 for Linux x86-64 is the CUDA build; it runs on the CPU with its CUDA libraries
#    installed, about 3 GB to download and 5 GB on disk, kept in $HYDRA_DRY_VENV between runs) and only packages
#    that the image has too (bench/gpu_image.txt): whatever pip pulled in beyond them is removed again;
# 2. a copy of what the device tool sends (tracked files, untracked files git does not ignore, .gpu-carry), no .git;
# 3. the device call's exact command (bench/gpu_run.py's RUN_CALL), in that copy, in an empty environment with
#    HYDRA_GPU_DEVICE=cpu and a fresh $OUT, the carried wheels installed as on the GPU machine;
# 4. $OUT checked against what the device tool returns (at most 8 files, 16 MiB each, names it accepts) and the
#    results against the keys a GPU run writes.
#
# HYDRA_GPU_TESTS=all runs every `gpu` test instead of the covering subset (tens of minutes here), with
# HYDRA_GPU_BUDGET_S raised to match. Not part of CI: the environment alone is a multi-GB download
# (tests/test_gpu_run.py checks the cheap parts, and runs the entry point in CI's own environment).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO="$PWD"
VENV="${HYDRA_DRY_VENV:-$HOME/.cache/hydra-ablate/gpu-dry-venv}"
# The image's versions where known (bench/gpu_image.txt), and what the run uses from the image besides them.
IMAGE_SUBSET=(torch==2.11.0 triton==3.6.0 transformers==5.17.0 tokenizers==0.23.2 safetensors==0.8.0
    huggingface-hub==1.33.0 accelerate==1.15.0 numpy==2.5.2 pytest pytest-timeout pytest-xdist packaging pyyaml
    httpx tqdm cloudpickle jinja2 filelock fsspec regex psutil typing-extensions)

python312="${PYTHON312:-}"
if [ -z "$python312" ]; then
    for candidate in "$(command -v python3.12 || true)" /root/.pyenv/versions/3.12*/bin/python3.12; do
        if [ -n "$candidate" ] && "$candidate" -V >/dev/null 2>&1; then python312="$candidate"; break; fi
    done
fi
[ -n "$python312" ] || { echo "gpu_dry_run: no working python3.12 (set PYTHON312)" >&2; exit 2; }
[ -d .gpu-carry/wheels ] || { echo "gpu_dry_run: no .gpu-carry/wheels: run python bench/gpu_prepare.py" >&2; exit 2; }

started=$(date +%s)
stamp="$(printf '%s\n' "${IMAGE_SUBSET[@]}" | cat - bench/gpu_image.txt | sha256sum | cut -c1-16)"
if [ "$(cat "$VENV/.hydra-image" 2>/dev/null)" != "$stamp" ]; then
    echo "== building the image stand-in in $VENV (once; about 3 GB to download)"
    rm -rf "$VENV"
    "$python312" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q "${IMAGE_SUBSET[@]}"
    # Remove what the image does not have (a newer typer's pydantic, say): the dry run must not find a package
    # there that the GPU machine lacks.
    extra="$(cd / && "$VENV/bin/python" -I - "$REPO/bench/gpu_image.txt" <<'PY'
import importlib.metadata as metadata, re, sys
norm = lambda name: re.sub(r"[-_.]+", "-", name.strip()).lower()
image = {norm(line.split("==")[0]) for line in open(sys.argv[1]) if line.strip() and not line.startswith("#")}
names = {d.metadata["Name"] for d in metadata.distributions()}
print(" ".join(sorted(name for name in names if norm(name) not in image)))
PY
)"
    if [ -n "$extra" ]; then
        echo "   not on the image, removed: $extra"
        # shellcheck disable=SC2086 # one name per word
        "$VENV/bin/python" -m pip uninstall -q -y $extra
    fi
    echo "$stamp" > "$VENV/.hydra-image"
fi
"$VENV/bin/python" -c 'import sys, torch, transformers; print("== stand-in:", sys.version.split()[0], "torch",
    torch.__version__, "transformers", transformers.__version__)'

work="$(mktemp -d /tmp/hydra-gpu-dry.XXXXXX)"
mkdir -p "$work/repo" "$work/out" "$work/home"
git ls-files -z --cached --others --exclude-standard | tar --null --ignore-failed-read -T - -cf - 2>/dev/null \
    | tar -xf - -C "$work/repo"
cp -r .gpu-carry "$work/repo/"
echo "== the copy that travels: $(du -sb "$work/repo" | cut -f1) bytes in $work/repo"
command="$("$VENV/bin/python" bench/gpu_run.py --print-run-call | "$VENV/bin/python" -c \
    'import json, sys; print(json.load(sys.stdin)["run"]["command"])')"
echo "== the device call's command, on the CPU: $command"
set +e
(cd "$work/repo" && env -i PATH="$VENV/bin:/usr/local/bin:/usr/bin:/bin" HOME="$work/home" LANG=C.UTF-8 \
    OUT="$work/out" HYDRA_GPU_DEVICE=cpu ${HYDRA_GPU_BUDGET_S:+HYDRA_GPU_BUDGET_S="$HYDRA_GPU_BUDGET_S"} \
    ${HYDRA_GPU_TESTS:+HYDRA_GPU_TESTS="$HYDRA_GPU_TESTS"} bash -c "$command")
code=$?
set -e
echo "== exit $code after $(( $(date +%s) - started )) s; checking $work/out as the device tool returns it"
checked=0
"$VENV/bin/python" bench/gpu_run.py --check-out "$work/out" || checked=$?
if [ "$code" = 0 ] && [ "$checked" = 0 ]; then
    echo "== dry run OK: every phase ran, every test passed or was skipped with its reason ($work/out)"
elif [ "$checked" = 0 ]; then
    echo "== dry run: every phase ran and \$OUT is what a GPU run returns, but the run exited $code (a test failed"
    echo "   or a phase reported an error: the summary above, $work/out/gpu-results.json)"
else
    echo "== dry run FAILED: the problems above ($work/out)"
fi
exit $(( code != 0 || checked != 0 ))
