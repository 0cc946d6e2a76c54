"""Holding a `celery worker` subprocess at a chunk's progress report, so that a fault lands mid-chunk on any load.

A fault test must kill, pause or cut off a worker while a chunk runs, between two of its prompts. Watching the
progress in Redis and striking within a prompt's time (a fraction of a second) fails on a loaded machine: the test's
process may not run at all in that window. Instead the worker is started as `python -m tests.worker_gate ...`
(`WorkerProcess(..., gate=folder)`), which runs Celery unchanged except that, after each progress report it
recorded, the reporting thread waits while the test holds the gate:

- the test creates `hold`; at each report the worker writes `held-<pid>.json` (job, chunk, prompts done so far)
  and waits while both `hold` and that file exist;
- the test reads the held files: the one it wants stays (the worker is held there, mid-chunk, for as long as the
  test needs), any other is deleted (that worker goes on to its next report);
- deleting `hold` lets every worker go on.

Only the test's worker subprocesses run this; the service has no such hook. The lease's heartbeat keeps running
while a report waits (it is another thread), as it does while a prompt computes.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

GATE_ENV = "HYDRA_TEST_WORKER_GATE"
HOLD = "hold"


@dataclass(frozen=True)
class Held:
    """A worker waiting at a progress report: its pool process, and where its chunk stands."""

    pid: int
    job_id: str
    chunk: int
    done: int  # ablated runs of this chunk done so far (what the report recorded)
    path: Path


class Gate:
    """The test's side: hold workers at their progress reports, pick the one wanted, let them go."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)

    def close(self) -> None:
        """From now on a worker waits at each progress report."""
        (self.folder / HOLD).touch()

    def open(self) -> None:
        """Every worker goes on (and no longer waits)."""
        (self.folder / HOLD).unlink(missing_ok=True)
        for path in self.folder.glob("held-*.json"):
            path.unlink(missing_ok=True)

    def release(self, held: Held) -> None:
        """That worker goes on to its next report (where it waits again while the gate is closed)."""
        held.path.unlink(missing_ok=True)

    def catch(self, wanted: Callable[[Held], bool], timeout_s: float, what: str, log: Callable[[], str]) -> Held:
        """Close the gate and wait until a worker is held where `wanted` says; every other report is let go."""
        self.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for path in sorted(self.folder.glob("held-*.json")):
                held = _read(path)
                if held is None:
                    continue
                if wanted(held):
                    return held
                self.release(held)
            time.sleep(0.02)
        raise AssertionError(f"timed out waiting for {what}\n{log()}")


def _read(path: Path) -> Held | None:
    try:
        state = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None  # gone meanwhile (released), or written by os.replace only once whole: never half read
    return Held(pid=state["pid"], job_id=state["job_id"], chunk=state["chunk"], done=state["done"], path=path)


def _install(folder: Path) -> None:
    """Wrap ChunkBook.record_progress (the worker's one call per progress report) in this process and its forks."""
    from service.core.chunk_book import ChunkBook

    original = ChunkBook.record_progress

    def record_progress(self: ChunkBook, job_id: str, index: int, done: int) -> Any:
        summed = original(self, job_id, index, done)
        hold = folder / HOLD
        if hold.exists():
            held = folder / f"held-{os.getpid()}.json"
            partial = held.with_suffix(".part")
            partial.write_text(json.dumps({"pid": os.getpid(), "job_id": job_id, "chunk": index, "done": done}))
            os.replace(partial, held)
            while hold.exists() and held.exists():
                time.sleep(0.01)
            held.unlink(missing_ok=True)
        return summed

    ChunkBook.record_progress = record_progress  # type: ignore[method-assign]


def main() -> None:
    """`python -m tests.worker_gate <celery arguments>`: Celery's command line, with the gate installed."""
    _install(Path(os.environ[GATE_ENV]))
    from celery.__main__ import main as celery_main

    sys.argv[0] = "celery"
    celery_main()


if __name__ == "__main__":
    main()
