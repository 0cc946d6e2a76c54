"""The local stack's API runs as several processes on one port (service/api/serve.py: SO_REUSEPORT), its workers at a
lower CPU priority (cli/stack.py). Real processes, a real embedded Redis, real connections: the kernel spreads
the connections among the processes, /metrics counts every process's requests, a second stack cannot join the
port, and a worker's whole session runs at the stack's nice value.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from cli.stack import Stack, lower_priority
from service.api.serve import REUSE_PORT, port_is_free
from service.core.embedded_redis import free_port

pytestmark = pytest.mark.skipif(not REUSE_PORT, reason="SO_REUSEPORT spreads connections on Linux only")


@pytest.fixture
def stack(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Stack]:
    monkeypatch.delenv("REDIS_URL", raising=False)  # the stack's own embedded Redis
    monkeypatch.setenv("HYDRA_ACCESS_LOG", "off")
    stack = Stack(port=free_port(), workers=0, data_dir=tmp_path, api_processes=2)
    stack.start()
    try:
        deadline = time.monotonic() + 120
        while True:
            stack.check_alive()
            try:
                if httpx.get(f"{stack.api_url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the API processes did not start"
            time.sleep(0.2)
        yield stack
    finally:
        stack.stop()


def _api_pids(stack: Stack) -> list[int]:
    return [process.pid for name, process in stack.processes if name.startswith("api")]


def _requests_counted(metrics: str, route: str) -> float:
    pattern = rf'^hydra_http_request_duration_seconds_count\{{[^}}]*route="{re.escape(route)}"[^}}]*\}} (\S+)$'
    return sum(float(value) for value in re.findall(pattern, metrics, flags=re.MULTILINE))


def test_connections_are_spread_over_the_api_processes_and_metrics_count_them_all(stack: Stack) -> None:
    pids = _api_pids(stack)
    assert len(pids) == 2
    clients = [httpx.Client(base_url=stack.api_url, timeout=10) for _ in range(40)]  # a connection each
    try:
        for client in clients:
            assert client.get("/health").status_code == 200
        # While the 40 connections are open, each process holds some (all on one: a chance of 2 in 2**40).
        held = {
            pid: sum(
                1 for c in psutil.Process(pid).net_connections(kind="tcp")
                if c.laddr and c.laddr.port == stack.port and c.status == psutil.CONN_ESTABLISHED
            )
            for pid in pids
        }  # fmt: skip
        assert sum(held.values()) == 40 and min(held.values()) > 0, held
    finally:
        for client in clients:
            client.close()
    # Any process answers /metrics with every process's requests (one histogram file per process).
    for _ in range(4):
        assert _requests_counted(httpx.get(f"{stack.api_url}/metrics", timeout=10).text, "/health") >= 40
    shared = stack.data_dir / "api-metrics"
    assert len(list(shared.glob("histogram_*.db"))) == 2


def test_a_second_stack_cannot_join_the_port(stack: Stack) -> None:
    """SO_REUSEPORT would let any process of the same user share the port; the stack and `serve` probe first."""
    assert not port_is_free(stack.host, stack.port)
    assert port_is_free(stack.host, free_port())


def test_a_worker_session_runs_at_the_lower_priority() -> None:
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"], start_new_session=True)
    try:
        lower_priority(process.pid, 10)
        assert os.getpriority(os.PRIO_PROCESS, process.pid) == 10
        autogroup = Path(f"/proc/{process.pid}/autogroup")
        if autogroup.exists():
            assert autogroup.read_text().split()[-1] == "10"
    finally:
        process.kill()
        process.wait()
