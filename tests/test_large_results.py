"""Large results and a full Redis: results stored gzip-compressed and served compressed to clients that accept it,
chunk partials dropped when a job ends whatever the outcome, reads that keep working when Redis is full
(noeviction), and no "succeeded" job without its result under an evicting policy. Real app, real Redis servers."""

from __future__ import annotations

import gzip
import http.client
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest
import redis
from litestar.testing import TestClient

from service.api.app import create_app
from service.core.chunk_book import ChunkBook, ChunkResult
from service.core.embedded_redis import EmbeddedRedis
from service.core.redis_replies import bytes_or_none
from service.core.settings import Settings
from service.core.store import GZIP_MAGIC, JobStore
from tests.live_server import serve
from tests.test_figures import build_result, store_succeeded

KEY = "memory-key"


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    """A Redis of this test's own: these tests change its memory settings."""
    server = EmbeddedRedis(data_dir=tmp_path / "redis")
    server.start()
    yield server
    server.stop()


def settings_for(url: str) -> Settings:
    return Settings(redis_url=url, key_prefix="mem:", queue_name="hydra-mem", api_keys=f"tester:{KEY}:admin")


@pytest.fixture
def store(private_redis: EmbeddedRedis) -> Iterator[JobStore]:
    store = JobStore.from_settings(settings_for(private_redis.url))
    yield store
    store.close()


def test_results_are_stored_gzip_compressed_and_read_back_as_json(store: JobStore) -> None:
    result = build_result(n_layers=6, prompts=[f"prompt {i}" for i in range(40)], heads=2)
    job_id = store_succeeded(store, result)
    raw = bytes_or_none(store.client.get(store.keys.result(job_id)))
    assert raw is not None and raw.startswith(GZIP_MAGIC)
    encoded = store.result(job_id)
    assert encoded is not None and msgspec.json.decode(encoded)["id"] == job_id
    assert len(raw) * 2 < len(encoded), (len(raw), len(encoded))  # numbers compress well
    assert gzip.decompress(store.result_gzip(job_id) or b"") == encoded


def served(settings: Settings) -> Iterator[int]:
    with serve(create_app(settings)) as url:
        yield int(url.rsplit(":", 1)[1])


@pytest.fixture
def port(private_redis: EmbeddedRedis) -> Iterator[int]:
    yield from served(settings_for(private_redis.url))


def raw_get(port: int, path: str, **headers: str) -> tuple[int, dict[str, str], bytes]:
    """A GET whose body is returned exactly as sent (http.client does not decompress)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request("GET", path, headers={"X-API-Key": KEY, **headers})
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        connection.close()


def test_the_result_is_served_gzip_to_clients_that_accept_it(store: JobStore, port: int) -> None:
    result = build_result(n_layers=6, prompts=[f"prompt {i}" for i in range(40)], heads=2)
    job_id = store_succeeded(store, result)
    path = f"/v1/jobs/{job_id}/result"
    expected = store.result(job_id)

    status, headers, body = raw_get(port, path, **{"Accept-Encoding": "gzip, deflate"})
    assert status == 200 and headers["content-encoding"] == "gzip"
    assert "accept-encoding" in headers["vary"].lower()
    assert gzip.decompress(body) == expected and len(body) < len(expected or b"")

    for refusing in ({}, {"Accept-Encoding": "identity"}, {"Accept-Encoding": "gzip;q=0, identity"}):
        status, headers, body = raw_get(port, path, **refusing)
        assert status == 200 and "content-encoding" not in headers, refusing
        assert body == expected

    # Other formats are built from the decompressed JSON.
    status, headers, body = raw_get(port, f"{path}?format=csv", **{"Accept-Encoding": "gzip"})
    assert status == 200 and body.startswith(b"prompt_index,")


def _chunk(index: int) -> ChunkResult:
    result = build_result()
    return ChunkResult(
        index=index,
        start=index,
        stop=index + 1,
        components=result.components,
        response_basis=result.response_basis,
        near_tie_gap=0.1,
        prompts=result.prompts[index : index + 1],
        provenance=result.provenance,
    )


@pytest.mark.parametrize("outcome", ["failed", "cancelled"])
def test_chunk_partials_are_dropped_when_a_job_ends_without_a_result(store: JobStore, outcome: str) -> None:
    result = build_result()
    job = store.create(result.provenance.spec, total=4)
    assert store.mark_running(job.id)
    book = ChunkBook.for_store(store)
    assert book.record_result(job.id, 0, _chunk(0)) == 1
    assert book.record_result(job.id, 1, _chunk(1)) == 2
    assert store.client.exists(book.result_key(job.id, 0), book.result_key(job.id, 1)) == 2
    if outcome == "failed":
        assert store.mark_failed(job.id, "boom")
    else:
        assert store.request_cancel(job.id) is not None
    assert store.client.exists(book.result_key(job.id, 0), book.result_key(job.id, 1)) == 0
    # A chunk that finishes after the end records nothing.
    assert book.record_result(job.id, 2, _chunk(2)) == -1
    assert not store.client.exists(book.result_key(job.id, 2))


def _fill(client: redis.Redis) -> None:
    """Redis at maxmemory: the limit set just above what is used, then filled until a write is refused."""
    used = int(client.info("memory")["used_memory"])
    client.config_set("maxmemory", str(used + 2 * 1024 * 1024))
    filler = b"x" * 65536
    for i in range(10_000):
        try:
            client.set(f"filler:{i}", filler)
        except redis.exceptions.OutOfMemoryError:
            return
        except redis.ResponseError as exc:
            assert "OOM" in str(exc)
            return
    raise AssertionError("Redis never refused a write")


def test_reads_keep_working_when_redis_is_full(store: JobStore, private_redis: EmbeddedRedis) -> None:
    """maxmemory with noeviction: writes are refused (503 for a submit), reads are not turned into 503s by the
    rate limiter's counter write."""
    job_id = store_succeeded(store, build_result())
    store.client.config_set("maxmemory-policy", "noeviction")
    settings = settings_for(private_redis.url)
    with TestClient(create_app(settings)) as client:
        client.headers["X-API-Key"] = KEY
        assert client.get(f"/v1/jobs/{job_id}").status_code == 200  # connections open before Redis is full
        _fill(store.client)
        try:
            for path in (f"/v1/jobs/{job_id}", f"/v1/jobs/{job_id}/result", "/v1/jobs"):
                response = client.get(path)
                assert response.status_code == 200, (path, response.text)
            refused = client.post("/v1/jobs", json={"model": "tiny", "prompts": ["a b", "c d"]})
            assert refused.status_code in (422, 503), refused.text  # never a 500
        finally:
            store.client.config_set("maxmemory", "0")


def test_an_evicted_result_never_reads_as_succeeded(store: JobStore, private_redis: EmbeddedRedis) -> None:
    """With an evicting policy the result key can vanish while the job hash stays: the job then reads as failed,
    saying why, in its status, the listing and the result route."""
    job_id = store_succeeded(store, build_result())
    store.client.delete(store.keys.result(job_id))  # what allkeys-lru did to it
    status = store.status(job_id)
    assert status is not None and status.status == "failed" and "evicted" in (status.error or "")
    assert [item.status for item in store.page().items] == ["failed"]
    with TestClient(create_app(settings_for(private_redis.url))) as client:
        client.headers["X-API-Key"] = KEY
        assert client.get(f"/v1/jobs/{job_id}").json()["status"] == "failed"
        response = client.get(f"/v1/jobs/{job_id}/result")
        assert response.status_code == 409 and "evicted" in response.json()["detail"]
