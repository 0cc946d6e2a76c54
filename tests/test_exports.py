"""GET /v1/jobs/{id}/result in JSON, MessagePack and CSV, chosen by ?format= or Accept: real app, real Redis."""

from __future__ import annotations

import csv
import io

import msgspec
import pytest
from litestar.testing import TestClient

from hydra_ablate_client.wire import JobResult
from service.core.store import JobStore
from service.rendering.exports import CSV_COLUMNS, to_csv
from service.rendering.result_csv import neutralise
from tests import test_figures
from tests.test_figures import assert_problem, build_result, store_succeeded

# The same fixtures as test_figures: the real app on a private key prefix of the session's Redis.
settings = test_figures.settings
store = test_figures.store
client = test_figures.client


@pytest.fixture
def stored(store: JobStore) -> tuple[str, JobResult]:
    """A succeeded job whose result has an awkward prompt (quotes, comma, newline) and one near tie."""
    prompts = ['He said "hi, there"\nand', "Paris is in", "Ünïcode → ok;", "=1+1 is"]
    result = build_result(prompts=prompts, heads=1)
    job_id = store_succeeded(store, result)
    return job_id, msgspec.structs.replace(result, id=job_id)


def test_json_is_the_default_and_the_stored_bytes(
    client: TestClient, store: JobStore, stored: tuple[str, JobResult]
) -> None:
    job_id, result = stored
    for response in (
        client.get(f"/v1/jobs/{job_id}/result"),
        client.get(f"/v1/jobs/{job_id}/result", params={"format": "json"}),
        client.get(f"/v1/jobs/{job_id}/result", headers={"Accept": "application/json, application/problem+json"}),
        client.get(f"/v1/jobs/{job_id}/result", headers={"Accept": "text/html,*/*;q=0.8"}),
    ):
        assert response.status_code == 200, response.text
        assert response.headers["content-type"].startswith("application/json")
        assert response.headers["vary"] == "Accept, Accept-Encoding"
        assert response.content == store.result(job_id)
        assert msgspec.json.decode(response.content, type=JobResult) == result


@pytest.mark.parametrize(
    ("params", "headers", "media_type"),
    [
        ({"format": "msgpack"}, {}, "application/msgpack"),
        ({}, {"Accept": "application/msgpack"}, "application/msgpack"),
        ({}, {"Accept": "application/x-msgpack"}, "application/x-msgpack"),
        ({"format": "msgpack"}, {"Accept": "text/csv"}, "application/msgpack"),  # the query wins
    ],
)
def test_msgpack_decodes_to_the_same_result(
    client: TestClient, stored: tuple[str, JobResult], params: dict[str, str], headers: dict[str, str], media_type: str
) -> None:
    job_id, result = stored
    response = client.get(f"/v1/jobs/{job_id}/result", params=params, headers=headers)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == media_type
    assert msgspec.msgpack.decode(response.content, type=JobResult) == result
    assert response.content == msgspec.msgpack.encode(result)


@pytest.mark.parametrize(("params", "headers"), [({"format": "csv"}, {}), ({}, {"Accept": "text/csv"})])
def test_csv_has_one_row_per_prompt_and_component(
    client: TestClient, stored: tuple[str, JobResult], params: dict[str, str], headers: dict[str, str]
) -> None:
    job_id, result = stored
    response = client.get(f"/v1/jobs/{job_id}/result", params=params, headers=headers)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/csv")
    assert response.headers["content-disposition"] == f'attachment; filename="{job_id}.csv"'
    reader = csv.reader(io.StringIO(response.content.decode("utf-8"), newline=""))
    header, *rows = list(reader)
    assert tuple(header) == CSV_COLUMNS
    assert len(rows) == len(result.prompts) * len(result.components) == 4 * 7
    records = [dict(zip(header, row, strict=True)) for row in rows]
    for record in records:
        p = result.prompts[int(record["prompt_index"])]
        c = result.components.index(record["component"])
        assert record["prompt"] == neutralise(p.prompt)  # quotes, commas and newlines survive quoting
        assert int(record["target_id"]) == p.target_id and record["target_token"] == neutralise(p.target_token)
        assert float(record["total_effect"]) == p.total_effect[c]  # exact: shortest round-trip repr
        assert float(record["direct_effect"]) == p.direct_effect[c]
        assert float(record["compensation"]) == p.compensation[c]
        assert float(record["norm_response"]) == p.norm_response[c]
        assert float(record["clean_metric"]) == p.clean_metric
        assert record["near_tie"] == ("true" if p.near_tie else "false")
    assert [(r["prompt_index"], r["component"]) for r in records[:2]] == [("0", "attn.0"), ("0", "mlp.0")]
    assert sum(r["near_tie"] == "true" for r in records) == len(result.components)
    assert response.content == to_csv(result)


def test_csv_cells_that_a_spreadsheet_would_run_as_formulas_are_neutralised(
    client: TestClient, store: JobStore
) -> None:
    """OWASP CSV injection: text cells starting with =, +, -, @, tab or CR get a leading quote; numbers do not."""
    hostile = ["=HYPERLINK(\"http://x\")", "+1+1", "-2+3 is", "@SUM(A1)", "\tTAB", "\rCR", "plain"]
    result = build_result(prompts=hostile, heads=1)
    result = msgspec.structs.replace(
        result, prompts=[msgspec.structs.replace(p, target_token="=cmd|' /C calc'!A0") for p in result.prompts]
    )
    job_id = store_succeeded(store, result)
    response = client.get(f"/v1/jobs/{job_id}/result", params={"format": "csv"})
    assert response.status_code == 200, response.text
    assert b"\r\n" in response.content and response.content.count(b"\r\n") == response.content.count(b"\n")
    header, *rows = list(csv.reader(io.StringIO(response.content.decode("utf-8"), newline="")))
    prompts = {row[header.index("prompt")] for row in rows}
    assert prompts == {"'" + text for text in hostile[:-1]} | {"plain"}
    assert {row[header.index("target_token")] for row in rows} == {"'=cmd|' /C calc'!A0"}
    assert all(not row[header.index("total_effect")].startswith("'") for row in rows)


def test_unknown_formats_are_refused(client: TestClient, stored: tuple[str, JobResult]) -> None:
    job_id, _ = stored
    assert_problem(client.get(f"/v1/jobs/{job_id}/result", params={"format": "xml"}), 400, "format")
    body = assert_problem(
        client.get(f"/v1/jobs/{job_id}/result", headers={"Accept": "application/xml"}), 406, "application/xml"
    )
    for media_type in ("application/json", "application/msgpack", "text/csv"):
        assert media_type in body["detail"]


def test_exports_are_409_until_the_job_succeeded(client: TestClient, store: JobStore) -> None:
    spec = build_result().provenance.spec
    job = store.create(spec, total=24)
    for fmt in ("json", "msgpack", "csv"):
        assert_problem(client.get(f"/v1/jobs/{job.id}/result", params={"format": fmt}), 409, "queued", "0/24")
    assert_problem(client.get("/v1/jobs/no-such-job/result", params={"format": "csv"}), 404, "no-such-job")
