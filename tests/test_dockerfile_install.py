"""What the images would hold, without a Docker daemon: the exact file set each Dockerfile target copies (its COPY
lines, over the build context that .dockerignore leaves), installed as the Dockerfile installs it.

- api: a fresh virtual environment (no system site packages) and the Dockerfile's own `pip install` arguments,
  resolved by this machine's pip configuration (a local index and wheel folder: no network). From that install,
  outside the copied folder: the API app serves a stored result as Parquet from a real Redis, no torch is
  installed, and `hydra-ablate keys create` writes a key to that Redis.
- worker: the same file set installed without dependencies (`--no-deps`; torch, transformers and Celery come from
  this test environment through a .pth file, since the image's CUDA torch index is out of reach here); from that
  install the Celery app, its tasks and the engine import, with every package data file (Lua scripts) present.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest

from service.core.embedded_redis import EmbeddedRedis
from tests.test_figures import build_result

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
INSTALL_TIMEOUT_S = 900

pytestmark = pytest.mark.slow  # a real install into a fresh environment: about 1.5 minutes on 2 shared cores


def _logical_lines(text: str) -> list[str]:
    joined = re.sub(r"\\\n", " ", text)
    return [line.strip() for line in joined.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def stages() -> dict[str, dict[str, list[list[str]]]]:
    """Per target: its COPY sources and destinations and its `pip install` argument lists, inherited stages first."""
    found: dict[str, dict[str, list[list[str]]]] = {}
    current: dict[str, list[list[str]]] = {"copy": [], "pip": []}
    for line in _logical_lines(DOCKERFILE.read_text()):
        word, _, rest = line.partition(" ")
        if word.upper() == "FROM":
            match = re.match(r"(\S+)\s+AS\s+(\S+)", rest, flags=re.I)
            assert match, f"every stage is named: {line}"
            parent = found.get(match.group(1), {"copy": [], "pip": []})
            current = {"copy": list(parent["copy"]), "pip": list(parent["pip"])}
            found[match.group(2)] = current
        elif word.upper() == "COPY":
            parts = [part for part in rest.split() if not part.startswith("--")]
            current["copy"].append(parts)
        elif word.upper() == "RUN":
            for command in rest.split("&&"):
                words = command.split()
                if words[:2] == ["pip", "install"]:
                    current["pip"].append([word.strip('"') for word in words[2:]])
    return found


def context_files() -> list[str]:
    """The build context: the checkout's files (tracked, or new and not git-ignored) minus .dockerignore's."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=ROOT, capture_output=True, check=True,
    ).stdout.decode().split("\0")
    patterns = [
        line.strip().rstrip("/")
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]

    def ignored(path: str) -> bool:
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        for pattern in patterns:
            bare = pattern.removeprefix("**/")
            if any(fnmatch.fnmatch(prefix, pattern) or fnmatch.fnmatch(prefix.split("/")[-1], bare)
                   for prefix in prefixes):
                return True
        return False

    return [path for path in listed if path and (ROOT / path).is_file() and not ignored(path)]


def copy_file_set(target: str, app: Path) -> list[str]:
    """Copy what `target`'s COPY lines take from the context into `app` (the image's WORKDIR); returns the paths."""
    files = context_files()
    copied = []
    for *sources, destination in stages()[target]["copy"]:
        for source in sources:
            source = source.rstrip("/")
            for path in files:
                if path == source or path.startswith(source + "/"):
                    relative = path if destination in ("./", ".") else destination.rstrip("/") + path[len(source):]
                    target_path = app / relative.removeprefix("./")
                    target_path.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(ROOT / path, target_path)
                    copied.append(relative.removeprefix("./"))
    return copied


def fresh_venv(where: Path, see_packages_of_this_environment: bool = False) -> Path:
    subprocess.run([sys.executable, "-m", "venv", str(where)], check=True, timeout=120)
    python = where / "bin" / "python"
    if see_packages_of_this_environment:
        site = Path(subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True, text=True, check=True,
        ).stdout.strip())
        (site / "this_environment.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
        # The venv's bundled setuptools is older than pyproject.toml's metadata needs: build with this one.
        subprocess.run([str(python), "-m", "pip", "uninstall", "-q", "-y", "setuptools"], check=True, timeout=120)
    return python


def pip_install(python: Path, app: Path, arguments: list[str]) -> None:
    done = subprocess.run(
        [str(python), "-m", "pip", "install", "-q", *arguments],
        cwd=app, capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


@pytest.fixture(scope="module")
def image_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis(data_dir=tmp_path_factory.mktemp("image-redis"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


def test_the_dockerfile_targets_copy_the_client_package_and_the_project() -> None:
    targets = stages()
    assert set(targets) >= {"base", "api", "worker"}
    for name in ("api", "worker"):
        sources = {source for *sources, _ in targets[name]["copy"] for source in sources}
        assert {"pyproject.toml", "clients/python", "service", "worker", "cli"} <= sources
    assert targets["api"]["pip"] == [["./clients/python", "."]]


def test_the_api_image_file_set_installs_serves_parquet_and_creates_keys(
    tmp_path: Path, image_redis: EmbeddedRedis
) -> None:
    app = tmp_path / "app"
    copied = copy_file_set("api", app)
    assert "service/core/store/jobs.py" in copied and "clients/python/hydra_ablate_client/wire.py" in copied
    assert not any(path.startswith(("tests/", "docs/", "bench/")) for path in copied)
    python = fresh_venv(tmp_path / "venv")
    (pip_arguments,) = stages()["api"]["pip"]
    pip_install(python, app, pip_arguments)

    result = tmp_path / "result.json"
    result.write_bytes(msgspec.json.encode(build_result(prompts=["The river runs", "A cat sat on"], heads=1)))
    elsewhere = tmp_path / "elsewhere"  # not the copied folder: only what was installed can be imported
    elsewhere.mkdir()
    script = tmp_path / "serve_parquet.py"
    shutil.copy(ROOT / "tests" / "image_serve_parquet.py", script)
    env = {"PATH": f"{python.parent}:/usr/bin:/bin", "HOME": str(tmp_path), "HYDRA_ACCESS_LOG": "off"}
    served = subprocess.run(
        [str(python), str(script), image_redis.url, str(result)],
        cwd=elsewhere, capture_output=True, text=True, timeout=120, env=env,
    )
    assert served.returncode == 0, served.stderr[-3000:]
    answer = json.loads(served.stdout.strip().splitlines()[-1])
    assert answer["status"] == 200 and answer["content_type"] == "application/vnd.apache.parquet"
    assert answer["rows"] == 2 * 7  # prompts × components (3 layers × attn, mlp and one head)
    assert answer["service_at"].startswith(str(tmp_path / "venv")) and answer["torch"] is False

    created = subprocess.run(
        [str(python.parent / "hydra-ablate"), "keys", "create", "image-check"],
        cwd=elsewhere, capture_output=True, text=True, timeout=120, env={**env, "REDIS_URL": image_redis.url},
    )
    assert created.returncode == 0, created.stdout + created.stderr
    assert created.stdout.strip().startswith("hk_")
    import redis

    client = redis.Redis.from_url(image_redis.url)
    try:
        assert client.hlen("hydra:apikeys") == 1  # the CLI's default prefix
    finally:
        client.close()


def test_the_worker_image_file_set_installs_and_imports(tmp_path: Path) -> None:
    app = tmp_path / "app"
    copy_file_set("worker", app)
    python = fresh_venv(tmp_path / "venv", see_packages_of_this_environment=True)
    pip_install(python, app, ["--no-deps", "--no-build-isolation", "./clients/python", "."])
    probe = (
        "import json, worker, worker.celery_app, worker.tasks, worker.engine.sweep;"
        "from importlib.resources import files;"
        "lua = sorted(p.name for package in ('service.core', 'service.core.store', 'service.api')"
        " for p in files(package).iterdir() if p.name.endswith('.lua'));"
        "print(json.dumps({'worker_at': worker.__file__, 'lua': lua}))"
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {key: value for key, value in os.environ.items() if not key.startswith("HYDRA_")}
    env["PYTHONPATH"] = ""
    imported = subprocess.run(
        [str(python), "-c", probe], cwd=elsewhere, capture_output=True, text=True, timeout=300, env=env
    )
    assert imported.returncode == 0, imported.stderr[-3000:]
    answer = json.loads(imported.stdout.strip().splitlines()[-1])
    assert answer["worker_at"].startswith(str(tmp_path / "venv"))
    wanted = [path for folder in ("core", "core/store", "api") for path in (ROOT / "service" / folder).glob("*.lua")]
    assert answer["lua"] == sorted(path.name for path in wanted) and len(wanted) >= 23
