"""Children that die with `hydra-ablate serve`, even when it is killed with SIGKILL (a supervisor's stop timeout).

Two mechanisms, because either alone leaves something behind:
- `die_with_parent()`: a preexec_fn asking the kernel (Linux prctl PR_SET_PDEATHSIG) to send the child SIGTERM when
  the thread that started it ends. It reaches the direct children only, not what they fork (Celery's pool).
- `Guard`: a small watchdog process (`python -m cli.lifeline GRACE_S`) that `serve` tells, over a pipe, the process
  groups it started (each child leads a session of its own, so its forks share its group). When the pipe reaches
  end of file without the children having been stopped (serve is gone, however it ended), the guard sends each
  group SIGTERM, waits `grace_s`, then SIGKILLs what is left, and exits. It ignores SIGINT, SIGTERM and SIGHUP: a
  Ctrl-C in the terminal reaches it together with serve, and serve's own orderly stop must run to its end first.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
ORPHAN_GRACE_S = 5.0  # after serve is gone: how long its children get to stop on SIGTERM before SIGKILL


def die_with_parent(sig: int = signal.SIGTERM) -> Callable[[], None] | None:
    """A preexec_fn that has the kernel send `sig` to the child when this thread ends; None off Linux.

    The kernel ties the signal to the thread that forked, so only the main thread (which lives as long as the
    process) may use it; from another thread this returns None and the guard alone covers the child."""
    if not sys.platform.startswith("linux") or threading.current_thread() is not threading.main_thread():
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before the fork: the child only calls it
    parent = os.getpid()

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
        if os.getppid() != parent:  # the parent died between fork and prctl: nobody would signal us
            os._exit(1)

    return preexec


class Guard:
    """The serving side of the watchdog: `watch(pid)` after starting a child, `forget(pid)` once it is reaped."""

    def __init__(self, grace_s: float = ORPHAN_GRACE_S) -> None:
        self._process = subprocess.Popen(
            [sys.executable, "-m", "cli.lifeline", str(grace_s)], stdin=subprocess.PIPE, close_fds=True
        )

    @property
    def pid(self) -> int:
        return self._process.pid

    def _send(self, line: str) -> None:
        stdin = self._process.stdin
        if stdin is None or stdin.closed:
            return
        with contextlib.suppress(OSError):  # a dead guard: the children still have their parent-death signal
            stdin.write(line.encode() + b"\n")
            stdin.flush()

    def watch(self, pid: int) -> None:
        self._send(f"+{pid}")

    def forget(self, pid: int) -> None:
        self._send(f"-{pid}")

    def close(self) -> None:
        """After an orderly stop (every child forgotten): the guard sees end of file, has nothing to kill, exits."""
        if self._process.stdin is not None:
            with contextlib.suppress(OSError):
                self._process.stdin.close()
        try:
            self._process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _signal_groups(groups: set[int], sig: int) -> None:
    for pgid in groups:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, sig)


def end_groups(groups: set[int], grace_s: float) -> None:
    """SIGTERM each process group, SIGKILL whatever is left after `grace_s`."""
    _signal_groups(groups, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        groups = {pgid for pgid in groups if _group_alive(pgid)}
        if not groups:
            return
        time.sleep(0.1)
    _signal_groups(groups, signal.SIGKILL)


def main(argv: list[str]) -> None:
    grace_s = float(argv[0]) if argv else ORPHAN_GRACE_S
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    groups: set[int] = set()
    for raw in sys.stdin.buffer:
        line = raw.decode().strip()
        if line.startswith("+"):
            groups.add(int(line[1:]))
        elif line.startswith("-"):
            groups.discard(int(line[1:]))
    if groups:  # end of file with children still registered: serve is gone without stopping them
        end_groups(groups, grace_s)


if __name__ == "__main__":
    main(sys.argv[1:])
