"""`hydra-ablate serve` as a supervisor runs it, in a real process with its real children: a private embedded Redis
(password, no administrative commands, files only its owner can read), one data folder per stack, and children
that end with `serve` however `serve` ends: SIGKILL of serve, or its Redis dying under it.
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest
import redis

from service.api.serve import port_is_free
from service.core.embedded_redis import CONFIG_FILE, ENDPOINT_FILE, EmbeddedRedis, free_port
from tests.live_server import serve as serve_app

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl and /proc are Linux's")

GONE_WITHIN_S = 12.0  # the guard's grace (5 s) before SIGKILL, plus time for the kernel and init to reap


@dataclass
class Served:
    process: subprocess.Popen[bytes]
    port: int
    data_dir: Path
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def descendants(self) -> list[psutil.Process]:
        return psutil.Process(self.process.pid).children(recursive=True)

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.tiny_models import build_tiny_model

    return build_tiny_model("gpt2", tmp_path_factory.mktemp("tiny-gpt2"))


def serve_env(data_dir: Path, model: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL" and not k.startswith("HYDRA_")}
    env.update(
        HYDRA_DATA_DIR=str(data_dir),
        HYDRA_MODELS=f"tiny-gpt2={model}",
        HYDRA_API_PROCESSES="2",
        COLUMNS="200",
    )
    return env


def start_serve(data_dir: Path, port: int, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "cli.main", "serve", "--port", str(port), "--ready-timeout", "120"]
    with log.open("wb") as out:
        return subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)


@pytest.fixture
def served(tmp_path: Path, tiny_gpt2: Path) -> Iterator[Served]:
    data_dir = tmp_path / "data"
    port = free_port()
    log = tmp_path / "serve.log"
    process = start_serve(data_dir, port, serve_env(data_dir, tiny_gpt2), log)
    running = Served(process, port, data_dir, log)
    try:
        deadline = time.monotonic() + 150
        while True:
            assert process.poll() is None, running.output()
            try:
                if httpx.get(f"{running.url}/ready", timeout=3).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, running.output()
            time.sleep(0.3)
        yield running
    finally:
        leftovers = running.descendants() if process.poll() is None else []
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
        for child in leftovers:  # never leave a test's processes behind, whatever the test found
            if child.is_running():
                child.kill()


def wait_gone(pids: list[int], timeout_s: float) -> list[int]:
    deadline = time.monotonic() + timeout_s
    alive = pids
    while time.monotonic() < deadline:
        alive = [pid for pid in alive if psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"]
        if not alive:
            return []
        time.sleep(0.2)
    return alive


@pytest.mark.slow  # a whole `serve` with two API processes and a worker: a minute on a busy 2-core machine
def test_serve_keeps_its_redis_private_its_folder_single_and_dies_whole(
    served: Served, tiny_gpt2: Path, tmp_path: Path
) -> None:
    """One serve (starting one costs most of this test's time) checked from outside, then SIGKILLed."""
    redis_dir = served.data_dir / "redis"
    endpoint = redis_dir / ENDPOINT_FILE
    # Only the owner may enter the folder of the append-only file, or read the URL (its password) and the config.
    assert stat.S_IMODE(redis_dir.stat().st_mode) == 0o700
    for private in (endpoint, redis_dir / CONFIG_FILE):
        assert stat.S_IMODE(private.stat().st_mode) == 0o600, private
    url = endpoint.read_text().strip()
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    stranger = redis.Redis(host="127.0.0.1", port=port, socket_timeout=5)
    with pytest.raises(redis.AuthenticationError):  # NOAUTH: another local user reads and changes nothing
        stranger.get("anything")
    stranger.close()
    owner = redis.Redis.from_url(url, socket_timeout=5)
    try:
        assert owner.ping()
        for command in (("CONFIG", "SET", "dir", str(tmp_path)), ("SAVE",), ("DEBUG", "SLEEP", "0"), ("SHUTDOWN",)):
            with pytest.raises(redis.ResponseError, match="unknown command"):
                owner.execute_command(*command)
        assert owner.ping()
    finally:
        owner.close()
    # The password is on no command line (`ps` shows those to every user): it travels in the environment.
    password = url.split("@")[0].rsplit(":", 1)[1]
    children = served.descendants()
    for child in children:
        assert password not in " ".join(child.cmdline()), child.cmdline()

    # A second serve on another port with the same data folder is refused, naming the first.
    second = start_serve(served.data_dir, free_port(), serve_env(served.data_dir, tiny_gpt2), tmp_path / "2.log")
    assert second.wait(timeout=60) == 1
    refused = (tmp_path / "2.log").read_text()
    assert "in use by another `hydra-ablate serve`" in refused, refused
    assert f"pid {served.process.pid}" in refused and f":{served.port}" in refused, refused
    assert httpx.get(f"{served.url}/ready", timeout=5).status_code == 200  # the first one is untouched

    # SIGKILL (a supervisor's stop timeout): every child and grandchild ends, the port and the folder are free.
    names = " ".join(" ".join(child.cmdline()) for child in children)
    assert "redis-server" in names and "service.api.serve" in names and "celery" in names, names
    assert len(children) >= 6, names  # guard, Redis, two API processes, the worker and its pool process
    served.process.kill()
    served.process.wait()
    started = time.monotonic()
    alive = wait_gone([child.pid for child in children], GONE_WITHIN_S)
    assert not alive, [" ".join(psutil.Process(pid).cmdline()) for pid in alive]
    assert port_is_free("127.0.0.1", served.port)
    print(f"every child of a SIGKILLed serve gone after {time.monotonic() - started:.1f} s")
    from cli.data_lock import DataDirLock

    DataDirLock.acquire(served.data_dir, "127.0.0.1", served.port).release()


def test_the_stack_stops_with_an_error_when_its_redis_dies(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """serve's loop (Stack.run_until_signal) ends on check_alive's error: exit code 1, the stack stopped."""
    from cli.stack import Stack

    monkeypatch.delenv("REDIS_URL", raising=False)
    stack = Stack(port=free_port(), workers=0, data_dir=tmp_path, api_processes=1)
    stack.start()
    try:
        assert stack.redis is not None and stack.redis.pid is not None
        stack.check_alive()
        os.kill(stack.redis.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        with pytest.raises(RuntimeError, match="embedded Redis exited"):
            while time.monotonic() < deadline:
                stack.check_alive()
                time.sleep(0.1)
    finally:
        stack.stop()


def test_health_answers_503_while_the_stack_redis_is_gone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from service.api.app import create_app
    from service.core.settings import Settings

    server = EmbeddedRedis(tmp_path / "redis", private=True)
    server.start()
    monkeypatch.setenv("HYDRA_AUTH", "off")
    monkeypatch.setenv("HYDRA_ALLOW_NO_AUTH", "1")
    settings = Settings(redis_url=server.url, health_checks_redis=True, ready_cache_s=0.1, auth_enabled=False,
                        allow_no_auth=True)  # fmt: skip
    try:
        with serve_app(create_app(settings)) as url:
            assert httpx.get(f"{url}/health", timeout=10).status_code == 200
            server.stop()
            time.sleep(0.3)  # past the shared probe's cache
            answer = httpx.get(f"{url}/health", timeout=10)
            assert answer.status_code == 503 and "Redis" in answer.text, answer.text
    finally:
        server.stop()


def test_keys_cli_uses_the_private_redis_without_printing_its_password(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from cli.main import app as cli_app
    from service.core.api_keys import keys_hash

    monkeypatch.delenv("REDIS_URL", raising=False)
    monkeypatch.delenv("HYDRA_API_KEYS", raising=False)
    monkeypatch.setenv("HYDRA_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("HYDRA_KEY_PREFIX", "test-private-keys:")
    server = EmbeddedRedis(data_dir=tmp_path / "redis", private=True)  # where `hydra-ablate serve` puts it
    server.start()
    try:
        result = CliRunner().invoke(cli_app, ["keys", "create", "erin"])
        assert result.exit_code == 0, result.output
        assert server.password is not None and server.password not in result.output
        client = redis.Redis.from_url(server.url)
        assert client.hlen(keys_hash("test-private-keys:")) == 1
        client.close()
    finally:
        server.stop()
