"""The GPU session's preparation, checked without a GPU (bench/README.md, "A GPU session").

The full rehearsal, bench/gpu_dry_run.sh, needs a CPython 3.12 environment with torch 2.11, a multi-GB download,
so it is not run here; these tests check the parts that can go wrong cheaply: the device call within the tool's
limits, the carried wheels against what the run imports and the GPU image lacks, the entry point's own Python
(standard library only, valid on 3.12), the test-report plugin, and the entry point itself run on the CPU in this
environment, end to end, with the results checked as the dry run checks them.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bench.gpu_run import (
    CARRY,
    DEFAULT_BUDGET_S,
    RERUN_CALL,
    RESULT_KEYS,
    RUN_CALL,
    carried_pins,
    check_out,
    normalise,
    pinned_wheels,
    summarise_tests,
)

ROOT = Path(__file__).resolve().parents[1]
DEVICE_SECONDS = 15 * 60  # a session's GPU time, its machine's start included
MACHINE_START_S = 120  # a start takes a minute or more
ENTRY_POINT_OVERHEAD_S = 30  # installing, the env probe and writing, beyond the phases' budget
# What runs on the GPU machine's python3: everything the run imports from the checkout.
DEVICE_MODULES = ("tests.test_gpu", "tests.test_reduced_precision", "tests.test_memory", "tests.conftest",
                  "bench.gpu_measure", "bench.gpu_pytest_report", "service.core.resolve", "service.core.datasets",
                  "worker.engine.sweep", "worker.engine.clean", "worker.worker_settings")
REMOVED_IN_3_12 = {"distutils", "imp", "asynchat", "asyncore", "smtpd"}
# The checkout's import roots: the repository and the client package's folder (once it has one).
IMPORT_ROOTS = os.pathsep.join(str(p) for p in (ROOT, ROOT / "clients" / "python") if p.is_dir())


def image_packages() -> set[str]:
    lines = (ROOT / "bench" / "gpu_image.txt").read_text().splitlines()
    return {normalise(line.split("==")[0]) for line in lines if line.strip() and not line.startswith("#")}


def budget_of(call: dict[str, object]) -> float:
    command = str(call["command"])
    for word in command.split():
        if word.startswith("HYDRA_GPU_BUDGET_S="):
            return float(word.split("=", 1)[1])
    return DEFAULT_BUDGET_S


def test_the_device_calls_fit_the_tools_limits_with_room_for_a_rerun() -> None:
    for call in (RUN_CALL, RERUN_CALL):
        assert len(str(call["command"])) <= 2000
        carry = call["carry"]
        assert isinstance(carry, list) and 1 <= len(carry) <= 8 and all(len(path) <= 200 for path in carry)
        timeout = int(str(call["timeout_s"]))
        assert 1 <= timeout <= 600
        # The command ends by itself before the tool stops it.
        assert budget_of(call) + ENTRY_POINT_OVERHEAD_S + 30 <= timeout, call
    assert DEFAULT_BUDGET_S + ENTRY_POINT_OVERHEAD_S <= 8 * 60, "the first run must stay under 8 minutes"
    spent = MACHINE_START_S + sum(budget_of(call) + ENTRY_POINT_OVERHEAD_S for call in (RUN_CALL, RERUN_CALL))
    assert spent <= DEVICE_SECONDS, f"a run and a rerun take {spent:.0f} s of the {DEVICE_SECONDS} s"


def test_the_readme_shows_the_exact_calls() -> None:
    readme = (ROOT / "bench" / "README.md").read_text()
    for call in (RUN_CALL, RERUN_CALL):
        assert json.dumps(call) in readme, f"bench/README.md should show {json.dumps(call)}"


def test_the_carried_folder_is_ignored_by_git() -> None:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    probe = subprocess.run(["git", "check-ignore", "-q", f"{CARRY}/wheels/x.whl"], cwd=ROOT, check=False)
    assert probe.returncode == 0, f"{CARRY}/ must be git-ignored: it travels only as a carried path"


def test_no_carried_wheel_is_on_the_image_already() -> None:
    """A carried copy would shadow the image's own version (PYTHONPATH comes first)."""
    assert not set(pinned_wheels()) & image_packages()


def test_everything_the_run_imports_is_on_the_image_or_carried() -> None:
    """The third-party distributions that the checkout's modules on the device import (found by importing them in
    a fresh interpreter and reading the import-time imports of every module of the checkout that got loaded) are
    all on the GPU image or among the carried wheels. Imports inside functions run only when called: the dry run
    runs those paths. What those distributions need in turn is theirs: the image's own, or
    checked for the carried ones by the next test and by the dry run."""
    script = (
        "import ast, importlib, importlib.metadata as md, json, sys\n"
        f"root = {str(ROOT)!r}\n"
        f"for name in {DEVICE_MODULES!r}:\n"
        "    importlib.import_module(name)\n"
        "names = set()\n"
        "for module in list(sys.modules.values()):\n"
        "    path = getattr(module, '__file__', None) or ''\n"
        "    if not path.startswith(root + '/') or '/.venv/' in path:\n"
        "        continue\n"
        "    todo = list(ast.parse(open(path, encoding='utf-8').read()).body)\n"
        "    while todo:  # what runs at import: not function bodies, not `if TYPE_CHECKING:`\n"
        "        node = todo.pop()\n"
        "        if isinstance(node, ast.Import):\n"
        "            names |= {a.name.split('.')[0] for a in node.names}\n"
        "        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:\n"
        "            names.add(node.module.split('.')[0])\n"
        "        elif isinstance(node, ast.If) and 'TYPE_CHECKING' in ast.dump(node.test):\n"
        "            todo += node.orelse\n"
        "        elif isinstance(node, (ast.If, ast.Try, ast.With, ast.ClassDef)):\n"
        "            todo += [n for f in ('body', 'orelse', 'finalbody') for n in getattr(node, f, [])]\n"
        "            todo += [n for h in getattr(node, 'handlers', []) for n in h.body]\n"
        "found = md.packages_distributions()\n"
        "print(json.dumps(sorted({d for n in names - set(sys.stdlib_module_names) for d in found.get(n, [])})))\n"
    )
    env = {**os.environ, "PYTHONPATH": IMPORT_ROOTS}
    completed = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                               check=True, timeout=300)
    imported = {normalise(d) for d in json.loads(completed.stdout.splitlines()[-1])}
    assert {"torch", "transformers", "pytest", "msgspec", "redis"} <= imported
    missing = imported - image_packages() - set(pinned_wheels()) - {"hydra-ablate", "hydra-ablate-client"}
    assert not missing, f"not on the GPU image and not carried (add them to bench/gpu_wheels.txt): {missing}"


def test_the_carried_wheels_are_the_listed_ones_and_need_nothing_else() -> None:
    wheels = ROOT / CARRY / "wheels"
    if not wheels.is_dir():
        pytest.skip(f"no {CARRY}/wheels (python bench/gpu_prepare.py builds it; bench/gpu_dry_run.sh uses it)")
    assert carried_pins(wheels) == pinned_wheels()
    from zipfile import ZipFile

    from packaging.requirements import Requirement

    offered = image_packages() | set(pinned_wheels())
    for wheel in wheels.glob("*.whl"):
        with ZipFile(wheel) as archive:
            metadata = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
            lines = archive.read(metadata).decode().splitlines()
        for line in lines:
            if line.startswith("Requires-Dist:"):
                requirement = Requirement(line.split(":", 1)[1])
                marker = {"extra": "", "python_version": "3.12", "sys_platform": "linux",
                          "platform_system": "Linux", "implementation_name": "cpython"}
                if requirement.marker is None or requirement.marker.evaluate(marker):
                    assert normalise(requirement.name) in offered, f"{wheel.name} needs {requirement}"


def _python312() -> str | None:
    for candidate in [shutil.which("python3.12"), *sorted(Path("/root/.pyenv/versions").glob("3.12*/bin/python3.12"))]:
        if candidate and subprocess.run([str(candidate), "-V"], capture_output=True, check=False).returncode == 0:
            return str(candidate)
    return None


def test_the_entry_point_needs_only_the_standard_library() -> None:
    """bench/gpu_run.py runs before the carried wheels are installed."""
    tree = ast.parse((ROOT / "bench" / "gpu_run.py").read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.module and node.level == 0}
    assert imported <= set(sys.stdlib_module_names), imported - set(sys.stdlib_module_names)


def test_the_code_that_travels_compiles_on_python_3_12() -> None:
    """The GPU machine's python3 is CPython 3.12: every module of the checkout compiles there, and none imports
    what 3.12 removed."""
    files = [p for folder in ("service", "worker", "tests", "bench") for p in sorted((ROOT / folder).rglob("*.py"))]
    for path in files:
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
            assert not {n.split(".")[0] for n in names} & REMOVED_IN_3_12, f"{path}: {names}"
    python312 = _python312()
    if python312 is None:
        pytest.skip("no python3.12 here to compile with (the modules parse on this Python)")
    script = "import sys, ast\nfor p in sys.argv[1:]:\n    compile(open(p, encoding='utf-8').read(), p, 'exec')\n"
    completed = subprocess.run([python312, "-c", script, *map(str, files)], capture_output=True, text=True,
                               check=False)
    assert completed.returncode == 0, completed.stderr[-3000:]


def test_the_report_plugin_and_its_summary(tmp_path: Path) -> None:
    """The plugin writes one line per test phase (a pass, a failure, a skip, a setup error); the summary groups
    them by test function and counts each test once."""
    (tmp_path / "test_sample.py").write_text(
        "import pytest\n"
        "def test_cuda_budget_comes_from_free_memory(): pass\n"
        "def test_cuda_a_job_that_cannot_fit_fails_with_the_reason(): assert 1 == 2, 'too big'\n"
        "@pytest.mark.skip(reason='needs CUDA')\n"
        "def test_cuda_out_of_memory_halves_the_batch_and_keeps_the_numbers(): pass\n"
        "@pytest.fixture\n"
        "def broken(): raise RuntimeError('no device')\n"
        "def test_other(broken): pass\n"
    )
    lines = tmp_path / "lines.jsonl"
    env = {**os.environ, "HYDRA_GPU_TEST_REPORT": str(lines), "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-m", "pytest", "-p", "bench.gpu_pytest_report", "-q", "-p", "no:cacheprovider",
                    "--rootdir", str(tmp_path), "-c", os.devnull, str(tmp_path / "test_sample.py")],
                   cwd=tmp_path, env=env, capture_output=True, text=True, check=False, timeout=120)
    summary = summarise_tests(lines)
    assert summary["collected"] == 4 and summary["reported"] == 4 and summary["not_run"] == 0
    assert summary["counts"] == {"passed": 1, "failed": 1, "skipped": 1, "error": 1}
    groups = summary["groups"]
    assert groups["budget_from_free_memory"]["passed"] == 1
    assert groups["job_cannot_fit"]["failed"] == 1 and "too big" in groups["job_cannot_fit"]["problems"][0]["message"]
    assert "needs CUDA" in groups["oom_halving"]["problems"][0]["message"]
    assert next(g for name, g in groups.items() if name.startswith("other:"))["error"] == 1


@pytest.mark.slow  # two minutes: the whole entry point, every tiny family and the timing shapes, on the CPU
def test_the_entry_point_runs_on_the_cpu_and_writes_what_a_gpu_run_writes(tmp_path: Path) -> None:
    """The exact command, on the CPU, in this environment (no carried wheels: this environment has the packages),
    with one test of each kind and the 7B shape only (bench/gpu_dry_run.sh runs all three, and more tests, on
    the GPU machine's versions): every phase runs, every engine measures, and $OUT is what the device tool
    returns. nnsight is a bench-only dependency: where it is missing, its engine says so."""
    out = tmp_path / "out"
    carry = tmp_path / "carry"  # a tokenizer folder as bench/gpu_prepare.py makes it; no wheels
    export = ("from tests.tiny_models import load_tokenizer; import sys; "
              "load_tokenizer().save_pretrained(sys.argv[1])")
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_TOKENIZER_DIR"}
    subprocess.run([sys.executable, "-c", export, str(carry / "tokenizer")], cwd=ROOT, check=True,
                   env={**env, "PYTHONPATH": IMPORT_ROOTS}, timeout=300)
    env = {**env, "OUT": str(out), "HYDRA_GPU_DEVICE": "cpu", "PATH": f"{Path(sys.executable).parent}:{env['PATH']}"}
    completed = subprocess.run(
        ["bash", "bench/gpu_run.sh", "--tests", "smoke", "--budget-s", "90", "--carry", str(carry),
         "--shapes", "llama-7b"],
        cwd=ROOT, env=env, capture_output=True, text=True, check=False, timeout=400,
    )
    doc = json.loads((out / "gpu-results.json").read_text())
    assert tuple(doc) == RESULT_KEYS
    problems = [p for p in check_out(out, shapes=("llama-7b",)) if "nnsight" not in p]
    assert not problems, f"{problems}\n{completed.stdout[-4000:]}"
    assert doc["tests"]["counts"].get("passed", 0) >= 3 and not doc["tests"]["counts"].get("failed")
    assert doc["tests"]["groups"]["job_cannot_fit"]["skipped"] == 1  # CUDA's allocator only
    assert list(doc["throughput"]) == ["llama-7b"]
    for found in doc["throughput"].values():
        assert found["scaled_down"] and {"fast", "fast_equal_batch", "hooks_batched", "hooks"} <= set(found["engines"])
        assert found["speedups"]["fast_equal_batch_vs_hooks_batched"] is not None
        assert found["tflops"]["fast"] and found["tflops"]["matmul"]
        # The same total effects, within bfloat16's rounding, from the engine and from plain hooks.
        assert found["engines"]["hooks_batched"]["compared"] > 0
        assert found["engines"]["hooks_batched"]["max_abs_diff_vs_fast"] < 0.5
    assert doc["projection"]["prompts"] == 1209 and doc["projection"]["scaled_down"]
    assert doc["targets"]["applicable"] is False
    assert "== summary" in completed.stdout and (out / "gpu-run.log").read_text().endswith(completed.stdout[-200:])
