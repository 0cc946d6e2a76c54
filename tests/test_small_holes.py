"""Smaller holes a hostile visitor found, each checked on a real app over real Redis: anonymous page visits store
nothing, sign-in attempts are throttled (per address and per key tried), pages cannot be framed and run only the
server's own scripts.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import redis
from litestar.testing import TestClient

from service.api.app import create_app
from service.core.settings import Settings
from tests.conftest import private_settings
from tests.live_server import serve

KEY = "hk_small-holes-key-0123456789"


@pytest.fixture()
def settings(redis_url: str) -> Iterator[Settings]:
    with private_settings(redis_url, "holes", api_keys=f"dora:{KEY}", ui_login_limit=3) as made:
        yield made  # type: ignore[misc]


def csrf(page: str) -> str:
    match = re.search(r'name="csrf_token" value="([^"]+)"', page)
    assert match, page[:500]
    return match.group(1)


def session_keys(settings: Settings) -> int:
    client = redis.Redis.from_url(settings.redis_url)
    try:
        return sum(1 for _ in client.scan_iter(f"{settings.key_prefix}ui:session:*"))
    finally:
        client.close()


def test_anonymous_visits_store_nothing_and_the_sign_in_form_still_works(settings: Settings) -> None:
    with TestClient(create_app(settings), base_url="http://testserver.local") as client:
        for _ in range(40):  # each visit a new browser: no cookie
            client.cookies.clear()
            assert client.get("/ui/login").status_code == 200
            assert client.get("/ui/jobs", follow_redirects=False).status_code == 303
        assert session_keys(settings) == 0
        client.cookies.clear()
        login = client.get("/ui/login")
        assert client.post("/ui/login", data={"csrf_token": "forged", "api_key": KEY}).status_code == 403
        signed = client.post("/ui/login", data={"csrf_token": csrf(login.text), "api_key": KEY, "next": "/ui/jobs"})
        assert signed.status_code == 200 and "Signed in as" in signed.text
        assert session_keys(settings) == 1  # written on signing in, under a new id
        token = csrf(client.get("/ui/jobs").text)
        assert client.post("/ui/logout", data={"csrf_token": token}, follow_redirects=False).status_code == 303
        assert session_keys(settings) == 0


def _attempt(url: str, address: str, key: str) -> httpx.Response:
    """One sign-in from a browser at `address` (a loopback address of its own: the server sees it as the client)."""
    with httpx.Client(base_url=url, transport=httpx.HTTPTransport(local_address=address), timeout=10) as browser:
        token = csrf(browser.get("/ui/login").text)
        return browser.post("/ui/login", data={"csrf_token": token, "api_key": key, "next": "/ui/jobs"})


def test_sign_in_attempts_are_throttled_per_address_and_per_key_tried(settings: Settings) -> None:
    with serve(create_app(settings)) as url:
        answers = [_attempt(url, "127.0.0.2", f"hk_guess{i:04d}-xxxxxxxx").status_code for i in range(4)]
        assert answers == [401, 401, 401, 429], answers
        refused = _attempt(url, "127.0.0.2", KEY)
        assert refused.status_code == 429 and int(refused.headers["retry-after"]) > 0
        assert "sign-in attempts" in refused.text
        # Many addresses trying keys that start alike: refused past the limit too, whatever the address.
        tried = [_attempt(url, f"127.0.1.{i}", f"hk_same{i:04d}").status_code for i in range(1, 5)]
        assert tried == [401, 401, 401, 429], tried
        # Another address with another key is not held up by either.
        assert _attempt(url, "127.0.0.3", KEY).status_code == 303  # signed in, sent on to the jobs page


def test_pages_cannot_be_framed_and_run_only_the_servers_own_files(settings: Settings) -> None:
    with TestClient(create_app(settings), base_url="http://testserver.local") as client:
        for path in ("/ui/login", "/ui/static/ui.js", "/ui/jobs/unknown"):
            answer: Any = client.get(path, follow_redirects=False)
            assert answer.headers["x-frame-options"] == "DENY", path
            policy = answer.headers["content-security-policy"]
            assert "frame-ancestors 'none'" in policy and "script-src 'self'" in policy, path
            assert "unsafe-inline" not in policy
        page = client.get("/ui/login").text
        assert "<script>" not in page and " style=" not in page and " on" + "click=" not in page
        api = client.get("/health")
        assert api.headers["x-frame-options"] == "DENY" and api.headers["x-content-type-options"] == "nosniff"


def test_revoking_a_key_closes_its_open_event_streams(redis_url: str) -> None:
    import threading
    import time

    from hydra_ablate_client.wire import JobRequest, ModelInfo
    from service.core.api_keys import KeyRing
    from service.core.resolve import resolve
    from service.core.store import JobStore

    tiny = ModelInfo(id="tiny", architecture="llama", n_layers=3, n_heads=4, n_kv_heads=2, d_model=64,
                     vocab_size=100, parallel_blocks=False, source="local")  # fmt: skip
    with private_settings(redis_url, "holes-revoke") as settings:  # type: ignore[misc]
        ring = KeyRing(redis.Redis.from_url(redis_url), settings.key_prefix)
        erin, fred = ring.create("erin"), ring.create("fred")
        store = JobStore.from_settings(settings)
        spec = resolve(JobRequest(model="tiny", prompts=["a b", "c d"]), {"tiny": tiny}, settings)
        jobs = {"erin": store.create(spec, 6, "erin").id, "fred": store.create(spec, 6, "fred").id}  # queued: quiet
        closed: dict[str, float] = {}

        def follow(name: str, key: str) -> None:
            url = f"{base}/v1/jobs/{jobs[name]}/events"
            with httpx.stream("GET", url, headers={"X-API-Key": key}, timeout=httpx.Timeout(60, read=60)) as answer:
                assert answer.status_code == 200
                for _ in answer.iter_lines():
                    if stop.is_set():
                        return
            closed[name] = time.monotonic()

        try:
            with serve(create_app(settings)) as base:
                stop = threading.Event()
                threads = [threading.Thread(target=follow, args=pair, daemon=True) for pair in (("erin", erin),
                                                                                               ("fred", fred))]
                for thread in threads:
                    thread.start()
                time.sleep(1.0)
                ring.revoke("erin")
                revoked = time.monotonic()
                threads[0].join(timeout=20)
                assert "erin" in closed, "the revoked key's stream stayed open 20 s"
                assert closed["erin"] - revoked < 15
                assert "fred" not in closed  # another key's stream is untouched
                again = httpx.get(f"{base}/v1/jobs/{jobs['erin']}/events", headers={"X-API-Key": erin}, timeout=10)
                assert again.status_code == 401
                stop.set()
        finally:
            store.close()
            ring.client.close()


def test_a_job_deleted_while_its_figure_renders_leaves_no_figure(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import service.rendering.figure_cache as figure_cache
    from service.core.job_deletion import delete_finished_job
    from service.core.store import JobStore
    from tests.test_figures import build_result, store_succeeded

    with private_settings(redis_url, "holes-fig", auth_enabled=False, allow_no_auth=True) as settings:  # type: ignore[misc]
        store = JobStore.from_settings(settings)
        job_id = store_succeeded(store, build_result(prompts=["Paris is in", "Rome is in"]))
        real_render = figure_cache.render

        def render_then_deleted(*args: Any, **kwargs: Any) -> bytes:
            data = real_render(*args, **kwargs)
            assert delete_finished_job(store, job_id)  # DELETE /v1/jobs/{id} lands while the figure renders
            return bytes(data)

        monkeypatch.setattr(figure_cache, "render", render_then_deleted)
        try:
            with TestClient(create_app(settings), base_url="http://testserver.local") as client:
                client.get(f"/v1/jobs/{job_id}/figures/te_vs_de")
                assert client.get(f"/v1/jobs/{job_id}").status_code == 404
            left = [key for key in store.client.scan_iter(f"{store.prefix}*") if job_id.encode() in key]
            assert left == [], [(key, store.client.pttl(key)) for key in left]
        finally:
            store.close()


TINY_INFO = {"id": "tiny", "architecture": "llama", "n_layers": 3, "n_heads": 4, "n_kv_heads": 2, "d_model": 64,
             "vocab_size": 100, "parallel_blocks": False, "source": "local"}  # fmt: skip
SUBMIT = {"model": "tiny", "prompts": ["a b", "c d"], "components": ["mlp.0"]}


def test_an_idempotency_key_whose_job_was_deleted_answers_410(redis_url: str) -> None:
    from hydra_ablate_client.wire import ModelInfo
    from service.core.store import JobStore

    with private_settings(redis_url, "holes-idem", auth_enabled=False, allow_no_auth=True) as settings:  # type: ignore[misc]
        store = JobStore.from_settings(settings)
        store.advertise_model(ModelInfo(**TINY_INFO), ttl_s=600)  # type: ignore[arg-type]
        try:
            with TestClient(create_app(settings), base_url="http://testserver.local") as client:
                headers = {"Idempotency-Key": "nightly-sweep-1"}
                first = client.post("/v1/jobs", json=SUBMIT, headers=headers)
                assert first.status_code == 202, first.text
                job_id = first.json()["id"]
                again = client.post("/v1/jobs", json=SUBMIT, headers=headers)
                assert again.status_code == 202 and again.json()["id"] == job_id  # replayed while the job exists
                assert store.mark_failed(job_id, "made to end for this test")
                assert client.delete(f"/v1/jobs/{job_id}").status_code == 204
                gone = client.post("/v1/jobs", json=SUBMIT, headers=headers)
                assert gone.status_code == 410, gone.text
                assert job_id in gone.json()["detail"] and "new key" in gone.json()["detail"]
                renewed = client.post("/v1/jobs", json=SUBMIT, headers={"Idempotency-Key": "nightly-sweep-2"})
                assert renewed.status_code == 202
        finally:
            store.close()


def test_a_submit_whose_job_was_stored_never_answers_503_when_redis_fills_up(tmp_path: Any) -> None:
    """Redis reaches maxmemory between storing the job and pushing its message: the job cannot be queued nor
    marked failed, and stays stored as queued in the `unplanned` set (sent again by the sweep): the answer is the
    202 with its id. Before, it was a 503, and the client's retry made a second job."""
    from hydra_ablate_client.wire import ModelInfo
    from service.core.embedded_redis import EmbeddedRedis
    from service.core.store import JobStore

    server = EmbeddedRedis(tmp_path / "redis")  # not private: the test fills it with CONFIG SET maxmemory
    server.start()
    admin = redis.Redis.from_url(server.url)
    settings = Settings(redis_url=server.url, key_prefix="holes-oom:", auth_enabled=False, allow_no_auth=True)
    store = JobStore.from_settings(settings)
    store.advertise_model(ModelInfo(**TINY_INFO), ttl_s=600)  # type: ignore[arg-type]
    try:
        with TestClient(create_app(settings), base_url="http://testserver.local") as client:
            queue = client.app.state.queue
            real_enqueue = queue.enqueue_async

            async def enqueue_into_a_full_redis(aredis: Any, job_id: str) -> None:
                admin.config_set("maxmemory-policy", "noeviction")
                admin.config_set("maxmemory", "1")  # full from now on: every write is refused (OOM)
                await real_enqueue(aredis, job_id)

            queue.enqueue_async = enqueue_into_a_full_redis
            answer = client.post("/v1/jobs", json=SUBMIT)
            admin.config_set("maxmemory", "0")
            assert answer.status_code == 202, answer.text
            job_id = answer.json()["id"]
            stored = store.status(job_id)
            assert stored is not None and stored.status == "queued"
            assert admin.zscore(store.keys.unplanned, job_id) is not None  # the sweep sends it
    finally:
        admin.config_set("maxmemory", "0")
        admin.close()
        store.close()
        server.stop()


def _scanned_counts(client: redis.Redis, prefix: str) -> dict[str, int]:
    """The oracle: every job hash read one by one (what each scrape used to do)."""
    counts: dict[str, int] = {}
    for key in client.scan_iter(f"{prefix}job:*", count=1000):
        raw = client.hget(key, "status")
        if raw is not None:
            status = raw.decode() if isinstance(raw, bytes) else str(raw)
            counts[status] = counts.get(status, 0) + 1
    return counts


def _hget_calls(client: redis.Redis) -> int:
    return int(client.info("commandstats").get("cmdstat_hget", {}).get("calls", 0))


def test_metrics_counts_jobs_without_reading_every_job(tmp_path: Any) -> None:
    from hydra_ablate_client.wire import ModelInfo
    from service.core.embedded_redis import EmbeddedRedis
    from service.core.job_deletion import delete_finished_job
    from service.core.resolve import resolve
    from service.core.store import JobStore

    server = EmbeddedRedis(tmp_path / "redis")
    server.start()
    raw = redis.Redis.from_url(server.url)
    settings = Settings(redis_url=server.url, key_prefix="holes-metrics:", auth_enabled=False, allow_no_auth=True)
    store = JobStore.from_settings(settings)
    try:
        spec = resolve(tiny_request(), {"tiny": ModelInfo(**TINY_INFO)}, settings)  # type: ignore[arg-type]
        ids = [store.create(spec, 6, "erin" if i % 2 else None).id for i in range(300)]  # scripted and pipelined
        for job_id in ids[:120]:
            assert store.mark_running(job_id)
        for job_id in ids[:40]:
            assert store.mark_succeeded(job_id, b"{}")
        for job_id in ids[40:60]:
            assert store.mark_failed(job_id, "boom")
        for job_id in ids[200:230]:
            assert store.request_cancel(job_id) is not None
        for job_id in ids[:10] + ids[40:45] + ids[200:205]:
            assert delete_finished_job(store, job_id)
        want = {"queued": 300 - 120 - 30, "running": 120 - 60, "succeeded": 30, "failed": 15, "cancelled": 25}
        assert _scanned_counts(raw, settings.key_prefix) == want
        with TestClient(create_app(settings), base_url="http://testserver.local") as client:
            client.get("/metrics")  # the first scrape adds the jobs kept to the counts, once
            before = _hget_calls(raw)
            scrape = client.get("/metrics").text
            assert _hget_calls(raw) - before < 10  # a scrape reads no job hash (it read all 280 before)
        for state, count in want.items():
            assert f'hydra_jobs{{status="{state}"}} {float(count)}' in scrape, (state, scrape[:2000])
        # Jobs stored before the counts existed are counted too (added to them once).
        raw.delete(store.keys.by_status_ready, *(store.keys.by_status(state) for state in want))
        assert {k: v for k, v in store.count_by_status().items() if v} == want
    finally:
        store.close()
        raw.close()
        server.stop()


def test_expired_jobs_leave_the_counts(redis_url: str) -> None:
    import time

    from hydra_ablate_client.wire import ModelInfo
    from service.core.resolve import resolve
    from service.core.store import JobStore

    with private_settings(redis_url, "holes-expiry", result_ttl_s=1) as settings:  # type: ignore[misc]
        store = JobStore.from_settings(settings)
        spec = resolve(tiny_request(), {"tiny": ModelInfo(**TINY_INFO)}, settings)  # type: ignore[arg-type]
        for _ in range(5):
            store.create(spec, 6, "erin")
        assert store.count_by_status()["queued"] == 5
        time.sleep(2.5)
        assert store.count_by_status()["queued"] == 0 == len(_scanned_counts(store.client, settings.key_prefix))
        store.close()


def tiny_request() -> Any:
    """A request for the tiny model (its wire type imported here, as the other tests of this file do)."""
    from hydra_ablate_client.wire import JobRequest

    return JobRequest(model="tiny", prompts=["a b", "c d"], components=["mlp.0"])
