"""Deployment files: the compose file resolves (a real compose CLI, no daemon needed), the API image is torch-free,
both images run as a non-root user, and the settings the README promises are the ones compose sets."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = (ROOT / "Dockerfile").read_text()


def _compose_cli() -> list[str] | None:
    """`docker compose` (v2 plugin) or `docker-compose` (v1, e.g. Debian's); scripts/setup.sh installs the latter."""
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True, check=False).returncode == 0:
        return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    return [legacy] if legacy else None


def _compose_config(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    cli = _compose_cli()
    if cli is None:
        pytest.skip("no compose CLI: neither the docker compose plugin nor docker-compose is installed")
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("REDIS_", "HYDRA_"))}
    return subprocess.run(
        [*cli, "-f", str(ROOT / "docker-compose.yml"), "config"],
        capture_output=True, text=True, env={**clean, **env}, cwd=ROOT, timeout=60, check=False,
    )


def _stage(name: str) -> str:
    """The Dockerfile's text of one build stage."""
    match = re.search(rf"^FROM \S+ AS {name}\n(.*?)(?=^FROM |\Z)", DOCKERFILE, flags=re.MULTILINE | re.DOTALL)
    assert match, f"no stage {name!r} in the Dockerfile"
    return match.group(1)


def test_compose_config_resolves_with_the_promised_settings() -> None:
    done = _compose_config({"REDIS_PASSWORD": "s3cret", "HYDRA_TAG": "1.2.3"})
    assert done.returncode == 0, done.stderr
    config = yaml.safe_load(done.stdout)
    services = config["services"]
    # One tag for every image the compose file builds, each from its own target of the one Dockerfile.
    assert services["api"]["image"] == "hydra-ablate-api:1.2.3"
    assert services["worker"]["image"] == "hydra-ablate-worker:1.2.3"
    assert services["api"]["build"]["target"] == "api" and services["worker"]["build"]["target"] == "worker"
    worker_env = services["worker"]["environment"]
    assert worker_env["HYDRA_DTYPE"] == "bfloat16" and worker_env["HYDRA_DEVICE"] == "cuda"
    devices = services["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]
    # Redis: a password (through the environment, not argv), a memory cap, no eviction, persistence.
    redis = services["redis"]
    command = " ".join(redis["command"])
    for setting in ("--requirepass", "--maxmemory ", "--maxmemory-policy noeviction", "--appendonly yes"):
        assert setting in command, setting
    assert redis["environment"]["REDIS_PASSWORD"] == "s3cret" and "s3cret" not in command
    assert redis["environment"]["REDIS_MAXMEMORY"] == "4gb"  # a cap by default: results must not fill the host
    for name in ("api", "worker"):
        assert services[name]["environment"]["REDIS_URL"] == "redis://:s3cret@redis:6379/0"


def test_compose_refuses_to_run_redis_without_a_password() -> None:
    done = _compose_config({})
    assert done.returncode != 0
    assert "REDIS_PASSWORD" in done.stderr


def test_the_api_image_installs_no_torch() -> None:
    """The API stage installs the core dependencies only, and those hold no torch or transformers."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = " ".join(project["dependencies"]).lower()
    assert "torch" not in core and "transformers" not in core
    assert any(dep.startswith("torch") for dep in project["optional-dependencies"]["worker"])
    installs = re.findall(r"pip install ([^&\n\\]*)", _stage("api"))
    # The client package (which the project depends on) and the project with its core dependencies, nothing else.
    assert installs == ["./clients/python . "], installs
    assert 'pip install ./clients/python ".[worker]"' in _stage("worker")
    copied = re.findall(r"^COPY (\S+)", _stage("base"), flags=re.MULTILINE)
    assert {"clients/python", "service", "worker", "cli"} <= set(copied), copied


def test_the_api_starts_without_torch_installed() -> None:
    """Import the app with torch and transformers made unimportable, as in the API image."""
    code = (
        "import sys, importlib.abc\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name.split('.')[0] in ('torch', 'transformers'):\n"
        "            raise ImportError(f'{name} is not in the API image')\n"
        "sys.meta_path.insert(0, Block())\n"
        "from service.api.app import create_app\n"
        "from service.core.settings import Settings\n"
        "app = create_app(Settings())\n"
        "assert app.openapi_schema is not None\n"
        "assert not any(m.split('.')[0] in ('torch', 'transformers') for m in sys.modules)\n"
        "print('ok')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120, check=False
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_both_images_run_as_a_non_root_user() -> None:
    for stage in ("api", "worker"):
        users = re.findall(r"^USER (\S+)", _stage(stage), flags=re.MULTILINE)
        assert users and users[-1] not in ("root", "0"), stage
    assert "useradd" in _stage("base")


def test_dockerignore_keeps_weights_and_environments_out_of_the_build_context() -> None:
    ignored = set((ROOT / ".dockerignore").read_text().split())
    assert {".git", ".venv", "tests", "*.gguf", "*.safetensors"} <= ignored
