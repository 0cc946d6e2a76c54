"""Issue 12 on the real app and Redis (no worker needed): labels, list filters, unknown query parameters, DELETE of
finished jobs, batch submit, callback URL policy, the long poll, server-sent events and the Parquet export."""

from __future__ import annotations

import io
import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import pyarrow.parquet as pq
import pytest
from litestar.testing import TestClient

from hydra_ablate_client.wire import JobResult, PromptFields
from service.core.store import JobStore
from service.rendering.parquet import PARQUET_MEDIA_TYPE, from_parquet
from tests import test_api
from tests.test_api import assert_problem, submit
from tests.test_figures import build_result

settings = test_api.settings
store = test_api.store
client = test_api.client

JOB = {"model": "tiny", "prompts": ["a", "b"], "components": ["attn.0"]}


# --- labels ------------------------------------------------------------------------------------------------------


def test_name_tags_and_metadata_are_kept_and_returned(client: TestClient) -> None:
    metadata = {"run": "sweep-3", "lr": 0.5, "seed": 7, "ok": True, "note": None}
    job = submit(client, **JOB, name="capitals, small", tags=["paper", "exp:1"], metadata=metadata)
    assert (job["name"], job["tags"], job["metadata"]) == ("capitals, small", ["paper", "exp:1"], metadata)
    again = client.get(f"/v1/jobs/{job['id']}").json()
    assert (again["name"], again["tags"], again["metadata"]) == ("capitals, small", ["paper", "exp:1"], metadata)
    plain = submit(client, **JOB)
    assert (plain["name"], plain["tags"], plain["metadata"]) == (None, [], {})


def test_labels_are_bounded(client: TestClient) -> None:
    assert_problem(client.post("/v1/jobs", json={**JOB, "tags": ["has space"]}), 400)
    assert_problem(client.post("/v1/jobs", json={**JOB, "tags": [f"t{i}" for i in range(21)]}), 400)
    assert_problem(client.post("/v1/jobs", json={**JOB, "metadata": {"k": [1, 2]}}), 400)
    assert_problem(client.post("/v1/jobs", json={**JOB, "name": "x" * 201}), 400)
    body = assert_problem(client.post("/v1/jobs", json={**JOB, "metadata": {"k": "v" * 5000}}), 422, "4096 bytes")
    assert body["field"] == "metadata"


# --- listing --------------------------------------------------------------------------------------------------------


def test_list_filters_by_status_model_tag_and_creation_time(client: TestClient, store: JobStore) -> None:
    first = submit(client, **JOB, tags=["a"])
    time.sleep(0.01)
    middle = datetime.now(UTC)
    time.sleep(0.01)
    second = submit(client, **{**JOB, "model": "smollm2-135m"}, tags=["a", "b"])
    third = submit(client, **JOB, tags=["b"])
    store.mark_running(third["id"])

    def ids(**params: Any) -> list[str]:
        response = client.get("/v1/jobs", params=params)
        assert response.status_code == 200, response.text
        page = response.json()
        assert page["total"] == len(page["items"])
        return [job["id"] for job in page["items"]]

    assert ids() == [third["id"], second["id"], first["id"]]
    assert ids(status="running") == [third["id"]]
    assert ids(status="queued") == [second["id"], first["id"]]
    assert ids(model="smollm2-135m") == [second["id"]]
    assert ids(tag="a") == [second["id"], first["id"]]
    assert ids(tag="b", status="queued") == [second["id"]]
    assert ids(created_after=middle.isoformat()) == [third["id"], second["id"]]
    assert ids(created_before=middle.isoformat()) == [first["id"]]
    assert ids(created_before=(middle - timedelta(days=1)).isoformat()) == []
    page = client.get("/v1/jobs", params={"tag": "a", "limit": 1, "offset": 1}).json()
    assert page["total"] == 2 and [job["id"] for job in page["items"]] == [first["id"]]
    assert_problem(client.get("/v1/jobs", params={"status": "exploded"}), 400)


def test_unknown_query_parameters_are_400(client: TestClient) -> None:
    job = submit(client, **JOB)
    body = assert_problem(client.get("/v1/jobs", params={"stauts": "failed"}), 400, "stauts", "status")
    assert body["errors"][0]["key"] == "stauts"
    assert_problem(client.get(f"/v1/jobs/{job['id']}", params={"foo": "1"}), 400, "foo")
    assert_problem(client.get(f"/v1/jobs/{job['id']}/result", params={"fromat": "csv"}), 400, "fromat")
    assert_problem(client.get("/v1/models", params={"x": "1"}), 400, "x")
    assert client.get("/v1/jobs", params={"status": "queued", "limit": 5}).status_code == 200


# --- DELETE and batch -------------------------------------------------------------------------------------------


def test_delete_of_a_failed_job_removes_it_and_its_events(client: TestClient, store: JobStore) -> None:
    job = submit(client, **JOB)
    store.mark_running(job["id"])
    store.mark_failed(job["id"], "boom")
    assert store.client.exists(store.keys.events(job["id"]))
    assert client.delete(f"/v1/jobs/{job['id']}").status_code == 204
    assert not store.client.exists(store.keys.job(job["id"]), store.keys.events(job["id"]))
    assert_problem(client.get(f"/v1/jobs/{job['id']}"), 404)


def test_delete_of_a_succeeded_job_leaves_no_key_behind(client: TestClient, store: JobStore) -> None:
    """Result, events, chunk bookkeeping and every cached figure (default and custom sizes, every format) go."""
    from service.core.chunk_book import ChunkBook

    job_id = store_succeeded(store, build_result(prompts=["Paris is in", "Rome is in"]))
    book = ChunkBook.for_store(store)
    store.client.hset(book._key("plan", job_id), "n_chunks", 2)
    store.client.set(book.result_key(job_id, 1), b"partial")
    store.client.set(book.lease_key(job_id, 0), b"holder")
    for params in ({}, {"format": "svg"}, {"width": 640, "height": 480, "dpi": 80}, {"format": "pdf"}):
        response = client.get(f"/v1/jobs/{job_id}/figures/te_vs_de", params=params)
        assert response.status_code == 200, (params, response.text)
    assert len(store.cached_figure_keys(job_id)) == 4

    def job_keys() -> list[bytes]:
        return [key for key in store.client.scan_iter(f"{store.prefix}*") if job_id.encode() in key]

    assert job_keys()
    assert client.delete(f"/v1/jobs/{job_id}").status_code == 204
    assert job_keys() == []
    assert_problem(client.get(f"/v1/jobs/{job_id}"), 404)
    assert_problem(client.delete(f"/v1/jobs/{job_id}"), 404)


def test_batch_submit_queues_every_job_or_none(client: TestClient, store: JobStore) -> None:
    response = client.post("/v1/jobs/batch", json={"jobs": [{**JOB, "name": "one"}, {**JOB, "name": "two"}]})
    assert response.status_code == 202, response.text
    jobs = response.json()["jobs"]
    assert [job["name"] for job in jobs] == ["one", "two"] and all(job["status"] == "queued" for job in jobs)
    assert all(store.status(job["id"]) is not None for job in jobs)

    before = client.get("/v1/jobs").json()["total"]
    bad = client.post("/v1/jobs/batch", json={"jobs": [JOB, {**JOB, "components": ["attn.99"]}]})
    body = assert_problem(bad, 422, "jobs[1]")
    assert body["field"].startswith("jobs[1]")
    assert client.get("/v1/jobs").json()["total"] == before  # nothing of the batch was queued
    assert_problem(client.post("/v1/jobs/batch", json={"jobs": []}), 400)


# --- callback URL policy ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:9/hook",
        "http://localhost/hook",
        "http://10.1.2.3/x",
        "http://[::1]/x",
        "http://169.254.169.254/",
        "http://0/",
    ],
)
def test_private_and_loopback_callback_urls_are_refused(client: TestClient, url: str) -> None:
    body = assert_problem(client.post("/v1/jobs", json={**JOB, "callback_url": url}), 422, "HYDRA_CALLBACK_ALLOW")
    assert body["field"] == "callback_url"


@pytest.mark.parametrize("url", ["http://" + "x" * 70 + ".org/", "http://[abc/", "http://host:99999/", "https://u:p@example.org/"])
def test_malformed_callback_urls_are_422_not_500(client: TestClient, url: str) -> None:
    assert_problem(client.post("/v1/jobs", json={**JOB, "callback_url": url}), 422)


def test_the_operator_allow_list_admits_loopback(settings: Any, store: JobStore) -> None:
    from dataclasses import replace

    with test_api.keyed_client(replace(settings, callback_allow="127.0.0.0/8")) as allowed:
        job = submit(allowed, **JOB, callback_url="http://127.0.0.1:9/hook")
        assert job["callback_url"] == "http://127.0.0.1:9/hook" and job["callbacks"] == []
        assert_problem(allowed.post("/v1/jobs", json={**JOB, "callback_url": "http://10.0.0.1/"}), 422)


# --- long poll and server-sent events ---------------------------------------------------------------------------


def _later(delay_s: float, action: Any) -> threading.Thread:
    def run() -> None:
        time.sleep(delay_s)
        action()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_long_poll_returns_at_the_next_change(client: TestClient, store: JobStore) -> None:
    job = submit(client, **JOB)
    started = time.monotonic()
    quiet = client.get(f"/v1/jobs/{job['id']}", params={"wait": 0.5}).json()
    assert quiet["status"] == "queued" and time.monotonic() - started >= 0.45  # nothing changed: the full wait

    thread = _later(0.3, lambda: store.mark_running(job["id"]))
    started = time.monotonic()
    changed = client.get(f"/v1/jobs/{job['id']}", params={"wait": 20}).json()
    elapsed = time.monotonic() - started
    thread.join()
    assert changed["status"] == "running" and elapsed < 10

    store.mark_failed(job["id"], "x")
    started = time.monotonic()
    assert client.get(f"/v1/jobs/{job['id']}", params={"wait": 20}).json()["status"] == "failed"
    assert time.monotonic() - started < 5  # a finished job answers at once
    assert_problem(client.get(f"/v1/jobs/{job['id']}", params={"wait": 61}), 400)


def parse_sse(text: str) -> list[dict[str, str]]:
    events = []
    for block in text.replace("\r\n", "\n").split("\n\n"):
        fields: dict[str, str] = {}
        for line in block.split("\n"):
            if line and not line.startswith(":") and ":" in line:
                name, _, value = line.partition(":")
                fields[name] = fields.get(name, "") + value.removeprefix(" ")
        if fields:
            events.append(fields)
    return events


def test_event_stream_replays_every_phase_and_ends(client: TestClient, store: JobStore) -> None:
    job = submit(client, **JOB)
    job_id = job["id"]

    def work() -> None:
        store.mark_running(job_id)
        for phase in ("loading_model", "clean_passes", "ablating"):
            store.advance_phase(job_id, phase)
        store.set_progress(job_id, 1, 2, prompts_done=1)
        store.advance_phase(job_id, "clean_passes")  # a later chunk: phases never go back
        store.set_progress(job_id, 2, 2, prompts_done=2)
        store.advance_phase(job_id, "merging")
        store.mark_succeeded(job_id, b"{}")

    thread = _later(0.3, work)
    with client.stream("GET", f"/v1/jobs/{job_id}/events") as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        text = "".join(response.iter_text())
    thread.join()
    events = parse_sse(text)
    statuses = [msgspec.json.decode(e["data"]) for e in events if e["event"] in ("status", "progress")]
    phases = list(dict.fromkeys(s["phase"] for s in statuses))
    assert phases == ["queued", "loading_model", "clean_passes", "ablating", "merging", "finished"]
    assert [s["progress"]["prompts_done"] for s in statuses if s["phase"] == "ablating"] == [0, 1, 2]
    assert events[-1]["event"] == "end" and statuses[-1]["status"] == "succeeded"
    # Resuming after an event id replays only what came after it.
    resume_after = events[2]["id"]
    with client.stream("GET", f"/v1/jobs/{job_id}/events", headers={"Last-Event-ID": resume_after}) as response:
        resumed = parse_sse("".join(response.iter_text()))
    assert [e.get("id") for e in resumed] == [e.get("id") for e in events[3:]]


def test_event_stream_of_an_unknown_job_is_404(client: TestClient) -> None:
    assert_problem(client.get("/v1/jobs/nope/events"), 404)


# --- Parquet ------------------------------------------------------------------------------------------------------


def store_succeeded(store: JobStore, result: JobResult) -> str:
    """A job of the test key's, put through queued → running → succeeded as a worker would."""
    status = store.create(result.provenance.spec, len(result.prompts) * len(result.components), "tester")
    assert store.mark_running(status.id)
    assert store.mark_succeeded(status.id, msgspec.json.encode(msgspec.structs.replace(result, id=status.id)))
    return status.id


def dataset_result() -> JobResult:
    result = build_result(prompts=["Paris is in", "Rome is in", "Oslo is in"], heads=2)
    fields = [
        PromptFields(relation="P17", subject=s, answer=a, dataset_index=i)
        for i, (s, a) in enumerate([("Paris", "France"), ("Rome", "Italy"), ("Oslo", "Norway")])
    ]
    spec = msgspec.structs.replace(result.provenance.spec, prompt_fields=fields)
    return msgspec.structs.replace(result, provenance=msgspec.structs.replace(result.provenance, spec=spec))


@pytest.mark.parametrize(
    ("params", "headers"),
    [({"format": "parquet"}, {}), ({}, {"Accept": PARQUET_MEDIA_TYPE}), ({}, {"Accept": "application/x-parquet"})],
)
def test_parquet_reads_back_equal_to_the_json_result(
    client: TestClient, store: JobStore, params: dict[str, str], headers: dict[str, str]
) -> None:
    job_id = store_succeeded(store, dataset_result())
    response = client.get(f"/v1/jobs/{job_id}/result", params=params, headers=headers)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith(headers.get("Accept", PARQUET_MEDIA_TYPE))
    table = pq.read_table(io.BytesIO(response.content))
    as_json = msgspec.json.decode(client.get(f"/v1/jobs/{job_id}/result").content, type=JobResult)
    assert from_parquet(table) == as_json
    rows = table.to_pylist()
    assert len(rows) == 3 * len(as_json.components)
    first = rows[len(as_json.components) + 1]  # prompt 1, component 1
    got = (first["prompt"], first["relation"], first["subject"], first["answer"])
    assert got == ("Rome is in", "P17", "Rome", "Italy")
    assert first["total_effect"] == as_json.prompts[1].total_effect[1]
    assert first["response"] == as_json.prompts[1].response[1]
    heads = [row for row in rows if row["kind"] == "head"]
    assert {(row["layer"], row["head"]) for row in heads} == {(1, 0), (1, 1)}


def test_parquet_is_streamed_in_row_groups(store: JobStore) -> None:
    from service.rendering.parquet import iter_parquet

    result = build_result(prompts=[f"prompt {i}" for i in range(10)])
    pieces = list(iter_parquet(result, prompts_per_group=3))
    assert len(pieces) >= 4  # one piece per row group (4), then the footer
    parsed = pq.ParquetFile(io.BytesIO(b"".join(pieces)))
    assert parsed.num_row_groups == 4
    assert from_parquet(parsed.read()) == result


def test_to_pandas_tables(store: JobStore) -> None:
    result = dataset_result()
    long = result.to_pandas()
    n_components = len(result.components)
    assert len(long) == 3 * n_components
    assert {"relation", "subject", "answer", "kind", "layer", "head", "total_effect", "compensation"} <= set(long)
    row = long[(long.prompt_index == 2) & (long.component == "head.1.1")].iloc[0]
    c = result.components.index("head.1.1")
    assert (row["kind"], row["layer"], row["head"], row["subject"]) == ("head", 1, 1, "Oslo")
    assert long[long.kind == "mlp"]["head"].isna().all()
    assert row.direct_effect == result.prompts[2].direct_effect[c]
    summary = result.to_pandas("summary")
    assert list(summary.component) == [s.component for s in result.summary.components]
    assert summary.compensation_vs_direct_slope.tolist() == [
        s.compensation_vs_direct.slope for s in result.summary.components
    ]
    response = result.to_pandas("response")
    assert len(response) == 3 * n_components * len(result.response_basis)
    b = result.response_basis.index("mlp.2")
    rows = (response.prompt_index == 0) & (response.component == "attn.0") & (response.response_component == "mlp.2")
    pick = response[rows]
    assert pick.response.tolist() == [result.prompts[0].response[result.components.index("attn.0")][b]]
    mean = result.to_pandas("response_mean")
    assert len(mean) == n_components * len(result.response_basis)
    assert list(result.to_pandas("prompts").answer) == ["France", "Italy", "Norway"]
    assert result.to_arrow("summary").num_rows == len(result.summary.components)
