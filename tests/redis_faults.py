"""A real redis-server that can be made to refuse writes while it keeps answering reads (tests and bench/chaos.py).

- `full`: CONFIG SET maxmemory to 1 byte (policy noeviction): every write is refused with "OOM command not allowed
  when used memory > 'maxmemory'", as when Redis fills up.
- `failing_aof`: the append-only file cannot be written, as on a full disk. The server runs with SIGXFSZ ignored
  (started here, not by EmbeddedRedis), and its file size limit (RLIMIT_FSIZE, set from outside with prlimit) is
  lowered to the AOF's current size: its next append fails with EFBIG and Redis refuses every write with "MISCONF
  Errors writing to the AOF file: File too large". With the limit raised again Redis writes the AOF at its next
  retry (within a second) and accepts writes. Works as any user, root included (a read-only folder stops nobody
  who is root), on Redis 6 and 7.
"""

from __future__ import annotations

import resource
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import redis

from service.core.embedded_redis import free_port, redis_server_binary


class FaultyRedis:
    """redis-server on a free loopback port with append-only persistence in `data_dir`."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = Path(data_dir)
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, socket_timeout=10)

    def start(self, timeout_s: float = 10.0) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        command = [
            redis_server_binary(), "--bind", "127.0.0.1", "--port", str(self.port), "--dir", str(self.data_dir),
            "--appendonly", "yes", "--save", "", "--logfile", str(self.data_dir / "redis.log"),
        ]  # fmt: skip
        # restore_signals=False: the child keeps Python's SIGXFSZ disposition (ignored), so a write past the file
        # size limit fails with EFBIG instead of killing the server.
        self.process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, restore_signals=False
        )
        client = self.client()
        deadline = time.monotonic() + timeout_s
        try:
            while time.monotonic() < deadline:
                try:
                    if client.ping():
                        return
                except redis.ConnectionError:
                    time.sleep(0.05)
        finally:
            client.close()
        raise RuntimeError(f"redis-server did not answer on port {self.port}")

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None

    def log(self) -> str:
        return (self.data_dir / "redis.log").read_text(errors="replace")

    @contextmanager
    def full(self) -> Iterator[str]:
        """Redis at maxmemory (noeviction) while inside; yields the error a write gets."""
        client = self.client()
        before = str(client.config_get("maxmemory")["maxmemory"])
        client.config_set("maxmemory-policy", "noeviction")
        client.config_set("maxmemory", "1")
        try:
            error = writes_refused(client)
            assert error is not None
            yield error
        finally:
            client.config_set("maxmemory", before)
            client.close()

    @contextmanager
    def failing_aof(self, timeout_s: float = 20.0) -> Iterator[str]:
        """Writes refused because the AOF cannot be written, while inside; yields the error a write gets."""
        assert self.process is not None
        pid = self.process.pid
        client = self.client()
        _, hard = resource.prlimit(pid, resource.RLIMIT_FSIZE)
        aof = self.data_dir / "appendonly.aof"
        try:
            resource.prlimit(pid, resource.RLIMIT_FSIZE, (aof.stat().st_size, hard))
            deadline = time.monotonic() + timeout_s
            while (error := writes_refused(client)) is None:  # the first refused append turns the refusal on
                if time.monotonic() > deadline:
                    raise AssertionError("Redis kept accepting writes with its AOF at its size limit")
                time.sleep(0.05)
            yield error
        finally:
            resource.prlimit(pid, resource.RLIMIT_FSIZE, (hard, hard))
            deadline = time.monotonic() + timeout_s
            while writes_refused(client) is not None and time.monotonic() < deadline:
                time.sleep(0.1)
            client.close()


def writes_refused(client: redis.Redis) -> str | None:
    """The error a write gets now, or None when writes are accepted."""
    try:
        client.set("redis-faults:probe", str(time.time()))
    except redis.ResponseError as error:
        return str(error)
    return None
