"""The client distribution (clients/python) builds, installs without torch or the server, and works on its own."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import msgspec
import pytest

from tests.test_figures import build_result

ROOT = Path(__file__).resolve().parents[1]

# Run in a fresh interpreter that cannot import torch, the server (`service`), the worker or the CLI (`cli`).
PROBE = """
import sys
for name in ("torch", "service", "worker", "cli", "transformers"):
    sys.modules[name] = None
import hydra_ablate_client as h
from hydra_ablate_client.vocabulary import parse_component
from hydra_ablate_client.wire import JobResult
result = __import__("msgspec").json.decode(open(sys.argv[1], "rb").read(), type=JobResult)
frame = result.to_pandas()
assert parse_component("head.3.5") == ("head", 3, 5)
print("|".join([type(result).__module__, str(len(frame)), ",".join(sorted(set(frame.kind))), h.HydraClient.__module__]))
"""
CLIENT = ROOT / "clients" / "python" / "hydra_ablate_client"
MODULES = ("__init__", "http", "wire", "vocabulary", "tables")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    completed = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(out),
         str(ROOT / "clients" / "python")],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    (built,) = out.glob("hydra_ablate_client-*.whl")
    return built


def test_the_wheel_holds_the_client_package_as_it_is_in_the_repository(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    for module in MODULES:
        assert f"hydra_ablate_client/{module}.py" in names
        # Real files, the very ones the server, the worker and the CLI import (no symlinks, no copies).
        source = CLIENT / f"{module}.py"
        assert not source.is_symlink()
        assert zipfile.ZipFile(wheel).read(f"hydra_ablate_client/{module}.py") == source.read_bytes()
    assert not any(name.startswith(("service/", "worker/", "cli/", "client/")) for name in names)
    requires = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("METADATA"))).decode()
    dependencies = [line for line in requires.splitlines() if line.startswith("Requires-Dist:")]
    assert any("httpx" in line for line in dependencies) and not any("torch" in line for line in dependencies)


def test_the_repository_holds_no_symlinks() -> None:
    """Checkouts without symlink support (and wheels) must see the same files: every tracked file is a real one."""
    listed = subprocess.run(["git", "ls-files", "-s"], cwd=ROOT, capture_output=True, text=True, check=False)
    if listed.returncode != 0:
        pytest.skip("not a git checkout")
    links = [line.split("\t", 1)[1] for line in listed.stdout.splitlines() if line.startswith("120000")]
    assert links == []


def test_the_server_and_the_cli_use_the_client_package_itself() -> None:
    """One HydraError, one set of wire types: the CLI and the server import the client package's modules."""
    import cli.main
    import hydra_ablate_client.http
    import hydra_ablate_client.wire
    from service.api.controllers import jobs

    assert cli.main.HydraError is hydra_ablate_client.http.HydraError
    assert jobs.JobResult is hydra_ablate_client.wire.JobResult
    assert Path(hydra_ablate_client.wire.__file__).resolve() == (CLIENT / "wire.py").resolve()


def test_the_installed_client_works_without_torch_or_the_server(wheel: Path, tmp_path: Path) -> None:
    target = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(target)  # what pip would put in site-packages
    document = tmp_path / "result.json"
    document.write_bytes(msgspec.json.encode(build_result(prompts=["a", "b"], heads=1)))
    completed = subprocess.run(
        [sys.executable, "-c", PROBE, str(document)],
        capture_output=True, text=True, timeout=120, check=False, cwd=tmp_path,
        env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"},
    )
    assert completed.returncode == 0, completed.stderr
    module, rows, kinds, client_module = completed.stdout.strip().split("|")
    assert module == "hydra_ablate_client.wire" and client_module == "hydra_ablate_client.http"
    assert int(rows) == 2 * 7 and kinds == "attn,head,mlp"  # 2 prompts × (3 layers × attn, mlp + 1 head)
