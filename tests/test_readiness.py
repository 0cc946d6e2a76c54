"""/ready holds no request thread: concurrent probes share one Celery ping (real app under uvicorn, real Redis,
real Celery control ping with no worker answering, so each ping takes the full ready timeout)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import httpx
import pytest

from service.api.app import create_app
from service.core.queue import JobQueue
from service.core.settings import Settings
from tests.conftest import private_settings
from tests.live_server import serve


@pytest.fixture
def served(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, list[float]]]:
    """The app on a free port; the list records when each real worker ping started."""
    pings: list[float] = []
    original = JobQueue.worker_count

    def counted(self: JobQueue, timeout: float = 1.0) -> int:
        pings.append(time.monotonic())
        return original(self, timeout)

    monkeypatch.setattr(JobQueue, "worker_count", counted)
    # A Redis database of its own: Celery's control broadcasts are scoped by database, so the session's test worker
    # (database 0, started by other tests) does not answer this app's pings; here no worker must answer.
    lone_db = redis_url.rsplit("/", 1)[0] + "/7"
    with private_settings(lone_db, "ready", ready_timeout_s=1.0, ready_cache_s=60.0, api_keys="u:k") as settings:
        with serve(create_app(settings)) as url:
            yield url, pings


def test_concurrent_ready_probes_share_one_worker_ping(served: tuple[str, list[float]]) -> None:
    url, pings = served

    async def probe_all() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            return await asyncio.gather(*(http.get("/ready") for _ in range(20)))

    responses = asyncio.run(probe_all())
    assert {r.status_code for r in responses} == {503}
    assert all("no worker answered" in r.json()["detail"] for r in responses)
    assert len(pings) == 1, f"{len(pings)} pings for 20 concurrent probes"
    # Within the cache window the answer is reused: no new ping.
    assert httpx.get(f"{url}/ready", timeout=10).status_code == 503
    assert len(pings) == 1


def test_settings_read_the_cache_window(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HYDRA_READY_CACHE_S", "0.5")
    assert Settings.from_env().ready_cache_s == 0.5
    monkeypatch.setenv("HYDRA_READY_CACHE_S", "soon")
    with pytest.raises(ValueError, match="HYDRA_READY_CACHE_S"):
        Settings.from_env()
