"""One data folder, one `hydra-ablate serve`: a lock held for the stack's lifetime.

Two stacks on one folder would run two Redis servers on one append-only file, and after a rewrite and a restart
jobs that had been accepted were gone. The lock is an flock(2) on `serve.lock` in the data folder, which also says
who holds it (pid, address) so that a second `serve` can name the first. The kernel drops it when the last process
holding the file ends (serve passes it to its Redis, so a killed serve's Redis still holds it until it has exited):
a crash never leaves a stale lock behind.
"""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

LOCK_FILE = "serve.lock"


class DataDirInUse(RuntimeError):
    """Another `hydra-ablate serve` (or a process it started, still stopping) holds the data folder."""


class DataDirLock:
    def __init__(self, fd: int, path: Path) -> None:
        self.fd = fd
        self.path = path

    @classmethod
    def acquire(cls, data_dir: Path, host: str, port: int) -> DataDirLock:
        data_dir.mkdir(parents=True, exist_ok=True)
        path = data_dir / LOCK_FILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise DataDirInUse(
                f"the data folder {data_dir} is in use by another `hydra-ablate serve` ({holder}, or a process it "
                "started that is still stopping); stop it first, or give this one a folder of its own with "
                "HYDRA_DATA_DIR"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": host, "port": port}).encode() + b"\n", 0)
        return cls(fd, path)

    def release(self) -> None:
        if self.fd < 0:
            return
        os.close(self.fd)  # the file stays: deleting it could split two waiting starters onto two inodes
        self.fd = -1

    def __del__(self) -> None:  # a Stack dropped without stop(): do not keep the folder locked for nothing
        self.release()


def _read_holder(fd: int) -> str:
    try:
        holder = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return f"pid {int(holder['pid'])}, API on http://{holder['host']}:{int(holder['port'])}"
    except (OSError, ValueError, KeyError, TypeError):
        return "pid unknown"
