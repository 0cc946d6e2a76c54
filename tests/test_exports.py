"""GET /v1/jobs/{id}/result in JSON, MessagePack and CSV, chosen by ?format= or Accept: real app, real Redis; and the
Parquet file of a job with `verify`, whose prompts' estimates of every component come back from it."""

from __future__ import annotations

import csv
import io

import msgspec
import pyarrow.parquet as pq
import pytest
from litestar.testing import TestClient

from hydra_ablate_client.wire import (
    AttributionSummary,
    ComponentEstimates,
    Estimates,
    JobResult,
    PhaseCost,
    Verification,
    Verify,
)
from service.core.store import JobStore
from service.rendering.exports import CSV_COLUMNS, to_csv
from service.rendering.parquet import from_parquet
from service.rendering.result_csv import neutralise
from tests import test_figures
from tests.checks import present
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


def verified_result(methods: list[str]) -> JobResult:
    """A job with `verify` as the merge leaves it: rows for the 7 verified components, each prompt's estimates of
    all 11 components of the job (the verified ones and four heads) in `all_estimates`."""
    result = build_result(prompts=["a b", "c d", "e f"], heads=1)
    every = [*result.components, *(f"head.2.{h}" for h in range(4))]
    star = "atp_star" in methods

    def values(p: int, m: int, n: int) -> list[float]:
        return [round(0.25 * p - 0.5 * m + 0.125 * c - 1.0, 6) for c in range(n)]  # distinct per prompt and method

    prompts = []
    for p, prompt in enumerate(result.prompts):
        n = len(every)
        everything = ComponentEstimates(atp=values(p, 0, n), atp_qkfix=values(p, 1, n) if star else None,
                                        atp_star=values(p, 2, n) if star else None)
        verified = [every.index(name) for name in result.components]

        def pick(column: list[float] | None, picked: list[int] = verified) -> list[float] | None:
            return None if column is None else [column[c] for c in picked]

        prompts.append(msgspec.structs.replace(prompt, all_estimates=everything, estimates=Estimates(
            atp=pick(everything.atp) or [], atp_qkfix=pick(everything.atp_qkfix), atp_star=pick(everything.atp_star),
            abs_total_effect=[abs(v) for v in prompt.total_effect])))
    verification = Verification(
        ranked_by="atp", top=5, random=2, seed=0, components=every, mean_estimates=[0.0] * len(every),
        verified=list(result.components), exact_all_model_evaluations_per_prompt=2.0 + len(every),
        phases=[PhaseCost(phase="estimates", n_components=len(every), model_evaluations_per_prompt=3.0, seconds=0.5),
                PhaseCost(phase="exact", n_components=len(result.components),
                          model_evaluations_per_prompt=9.0, seconds=1.5)],
    )
    attribution = AttributionSummary(methods=methods, agreement=[], cost=[], errors=[],
                                     verified=list(result.components), verification=verification)
    spec = msgspec.structs.replace(result.provenance.spec, components=every, estimates=methods,
                                   verify=Verify(top=5, random=2))
    return msgspec.structs.replace(
        result, prompts=prompts, summary=msgspec.structs.replace(result.summary, attribution=attribution),
        provenance=msgspec.structs.replace(result.provenance, spec=spec),
    )


@pytest.mark.parametrize("methods", [["atp"], ["atp", "atp_star"]])
def test_parquet_of_a_verify_job_carries_every_components_estimates(
    client: TestClient, store: JobStore, stored: tuple[str, JobResult], methods: list[str]
) -> None:
    result = verified_result(methods)
    job_id = store_succeeded(store, result)
    result = msgspec.structs.replace(result, id=job_id)
    response = client.get(f"/v1/jobs/{job_id}/result", params={"format": "parquet"})
    assert response.status_code == 200, response.text
    table = pq.read_table(io.BytesIO(response.content))
    every = present(present(result.summary.attribution).verification).components
    n_rows = len(result.components)
    assert table.num_rows == len(result.prompts) * n_rows
    # Each prompt's lists on its first row, in `verification.components` order; null on its other rows.
    for name in ("atp", "atp_qkfix", "atp_star"):
        column = table.column(f"all_estimates_{name}").to_pylist()
        for p, prompt in enumerate(result.prompts):
            expected = getattr(prompt.all_estimates, name)
            assert column[p * n_rows] == expected and column[p * n_rows + 1 : (p + 1) * n_rows] == [None] * (n_rows - 1)
            assert expected is None or len(expected) == len(every) > n_rows
    back = from_parquet(table)
    assert back == result  # nothing of the JSON result is left out
    frame = back.to_pandas("all_estimates")
    assert frame.equals(result.to_pandas("all_estimates"))
    assert len(frame) == len(result.prompts) * len(every)
    row = frame[(frame["prompt_index"] == 2) & (frame["component"] == "head.2.3")].iloc[0]
    assert row["atp"] == present(result.prompts[2].all_estimates).atp[every.index("head.2.3")]
    assert (row["kind"], row["layer"], row["head"]) == ("head", 2, 3)
    assert (row["atp_star"] is None) == ("atp_star" not in methods)

    # A job without verify: no such columns, and an empty all_estimates table.
    plain_id, plain = stored
    raw = client.get(f"/v1/jobs/{plain_id}/result", params={"format": "parquet"}).content
    plain_table = pq.read_table(io.BytesIO(raw))
    assert not any(name.startswith("all_estimates") for name in plain_table.schema.names)
    assert from_parquet(plain_table) == plain and len(plain.to_pandas("all_estimates")) == 0
