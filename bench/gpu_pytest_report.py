"""A pytest plugin for bench/gpu_run.py: one JSON line per test phase, appended as each test ends, to the file named
by HYDRA_GPU_TEST_REPORT, so that a test run stopped at its time limit still says what passed before it.

    python -m pytest -p bench.gpu_pytest_report tests/test_gpu.py

Under pytest-xdist the controller writes every worker's reports (the workers write nothing); the number of tests
collected is written first, as {"collected": N}.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

REPORT_ENV = "HYDRA_GPU_TEST_REPORT"
_STATE: dict[str, Any] = {}


def _write(line: dict[str, Any]) -> None:
    path = _STATE.get("path")
    if path is None:
        return
    with Path(path).open("a", encoding="utf-8") as out:
        out.write(json.dumps(line) + "\n")


def pytest_configure(config: pytest.Config) -> None:
    worker = hasattr(config, "workerinput")  # an xdist worker: its controller reports
    _STATE["path"] = None if worker else (os.environ.get(REPORT_ENV) or None)


def pytest_collection_finish(session: pytest.Session) -> None:
    if not hasattr(session.config, "workerinput") and session.config.pluginmanager.getplugin("dsession") is None:
        _write({"collected": len(session.items)})


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_node_collection_finished(node: Any, ids: list[str]) -> None:
    if not _STATE.get("collected"):  # every worker collects the same tests
        _STATE["collected"] = True
        _write({"collected": len(ids)})


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    line: dict[str, Any] = {
        "nodeid": report.nodeid, "when": report.when, "outcome": report.outcome, "duration": report.duration,
    }
    if report.skipped and isinstance(report.longrepr, tuple):
        line["message"] = str(report.longrepr[2])  # (file, line, "Skipped: reason")
    elif report.failed:
        line["message"] = report.longreprtext[-3000:]
    _write(line)
