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

# Run in a fresh interpreter that cannot import torch, the server (`service`) or the CLI (`client`).
PROBE = """
import sys
for name in ("torch", "service", "client", "transformers"):
    sys.modules[name] = None
import hydra_ablate_client as h
from hydra_ablate_client.schemas import JobResult
result = __import__("msgspec").json.decode(open(sys.argv[1], "rb").read(), type=JobResult)
frame = result.to_pandas()
print("|".join([type(result).__module__, str(len(frame)), ",".join(sorted(set(frame.kind))), h.HydraClient.__module__]))
"""


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


def test_the_wheel_holds_the_client_and_a_copy_of_the_wire_types(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    for module in ("__init__", "http", "schemas", "_wire", "tables"):
        assert f"hydra_ablate_client/{module}.py" in names
    assert not any(name.startswith(("service/", "worker/", "client/")) for name in names)
    wire = zipfile.ZipFile(wheel).read("hydra_ablate_client/_wire.py")
    assert wire == (ROOT / "service" / "schemas.py").read_bytes()  # the symlink's target, not a stale copy
    requires = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("METADATA"))).decode()
    dependencies = [line for line in requires.splitlines() if line.startswith("Requires-Dist:")]
    assert any("httpx" in line for line in dependencies) and not any("torch" in line for line in dependencies)


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
    assert module == "hydra_ablate_client._wire" and client_module == "hydra_ablate_client.http"
    assert int(rows) == 2 * 7 and kinds == "attn,head,mlp"  # 2 prompts × (3 layers × attn, mlp + 1 head)
