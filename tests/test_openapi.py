"""The committed OpenAPI document must be the live app's: clients are generated from the file."""

from __future__ import annotations

import difflib
import json
from pathlib import Path

from service.export_openapi import openapi_json

COMMITTED = Path(__file__).resolve().parent.parent / "openapi" / "openapi.json"
REGENERATE = "python -m service.export_openapi"


def test_committed_openapi_matches_the_app() -> None:
    live = openapi_json()
    assert COMMITTED.exists(), f"{COMMITTED} is missing; run `{REGENERATE}` and commit it"
    committed = COMMITTED.read_text(encoding="utf-8")
    if committed != live:
        diff = "".join(
            list(difflib.unified_diff(committed.splitlines(True), live.splitlines(True), "committed", "live"))[:60]
        )
        raise AssertionError(f"openapi/openapi.json is out of date; run `{REGENERATE}` and commit it.\n{diff}")


def test_openapi_documents_errors_as_problem_details() -> None:
    schema = json.loads(openapi_json())
    assert schema["info"]["title"] == "hydra-ablate" and schema["info"]["version"] == "1.0.0"
    result = schema["paths"]["/v1/jobs/{job_id}/result"]["get"]["responses"]["200"]
    assert result["content"]["application/json"]["schema"]["$ref"] == "#/components/schemas/JobResult"
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            for code, response in operation["responses"].items():
                if int(code) >= 400:
                    assert list(response["content"]) == ["application/problem+json"], (method, path, code)
    assert schema["paths"]["/v1/jobs"]["post"]["responses"].keys() >= {"202", "400", "422", "503"}
