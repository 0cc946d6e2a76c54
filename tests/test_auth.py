"""Access control against the real app and the session's Redis: API keys, job ownership, the keys CLI.

Keys come from HYDRA_API_KEYS (Settings.api_keys) and from the Redis key ring the `hydra-ablate keys` commands
write; each test has its own key prefix, so neither keys nor jobs leak between tests.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest
import redis
from litestar.testing import TestClient
from typer.testing import CliRunner

from cli.main import app as cli_app
from service.api.app import create_app
from service.core.api_keys import KeyRing, key_digest, keys_hash, parse_api_keys
from service.core.redis_replies import bytes_hash
from service.core.settings import Settings
from service.core.store import JobStore
from tests.checks import present
from tests.conftest import private_settings
from tests.test_api import SMOLLM, TINY, assert_problem

ALICE, BOB, ROOT = "alice-key-1111", "bob-key-2222", "root-key-3333"
KEYS = f"alice:{ALICE},bob:{BOB},root:{ROOT}:admin"
TWO = ["Paris is the capital of", "Berlin is the capital of"]
JOB = {"model": "tiny", "prompts": TWO, "components": ["attn.0"]}


def auth(key: str) -> dict[str, str]:
    return {"X-API-Key": key}


@pytest.fixture
def settings(redis_url: str) -> Iterator[Settings]:
    with private_settings(redis_url, "auth", ready_timeout_s=0.3, api_keys=KEYS) as settings:
        yield settings


@pytest.fixture
def store(settings: Settings) -> Iterator[JobStore]:
    store = JobStore.from_settings(settings)
    store.advertise_model(SMOLLM)
    store.advertise_model(TINY)
    yield store
    store.close()


@pytest.fixture
def client(settings: Settings, store: JobStore) -> Iterator[TestClient]:
    """No key by default: each request names its key, so one app serves several callers."""
    with TestClient(create_app(settings)) as client:
        yield client


def submit(client: TestClient, key: str, **body: Any) -> dict[str, Any]:
    response = client.post("/v1/jobs", json=body or JOB, headers=auth(key))
    assert response.status_code == 202, response.text
    return response.json()


def assert_unauthorized(response: Any, *fragments: str) -> None:
    assert_problem(response, 401, *fragments)
    assert response.headers["www-authenticate"] == "ApiKey"


# --- who may call -----------------------------------------------------------------------------------------------


def test_job_routes_need_a_key(client: TestClient) -> None:
    job_id = uuid.uuid4().hex
    for method, path in [
        ("GET", "/v1/jobs"),
        ("POST", "/v1/jobs"),
        ("GET", f"/v1/jobs/{job_id}"),
        ("GET", f"/v1/jobs/{job_id}/result"),
        ("GET", f"/v1/jobs/{job_id}/figures/te_vs_de"),
        ("DELETE", f"/v1/jobs/{job_id}"),
    ]:
        body = JOB if method == "POST" else None
        assert_unauthorized(client.request(method, path, json=body), "missing", "X-API-Key")
        assert_unauthorized(client.request(method, path, json=body, headers=auth("not-a-key")), "unknown")


def test_health_models_and_schema_stay_open(client: TestClient) -> None:
    assert client.get("/health").status_code == 200
    assert client.get("/v1/models").status_code == 200
    assert client.get("/schema/openapi.json").status_code == 200
    ready = client.get("/ready")  # 200 or 503 depending on whether a worker shares this Redis: never 401
    assert ready.status_code in (200, 503), ready.text


def test_a_key_sees_only_its_own_jobs(client: TestClient, store: JobStore) -> None:
    mine = submit(client, ALICE)
    assert mine["owner"] == "alice"
    assert present(store.status(mine["id"])).owner == "alice"
    assert client.get(f"/v1/jobs/{mine['id']}", headers=auth(ALICE)).json()["id"] == mine["id"]

    # Another key: 404 everywhere, the same answer as for a job that never existed, and nothing changes.
    for method, path in [
        ("GET", f"/v1/jobs/{mine['id']}"),
        ("GET", f"/v1/jobs/{mine['id']}/result"),
        ("GET", f"/v1/jobs/{mine['id']}/figures/te_vs_de"),
        ("DELETE", f"/v1/jobs/{mine['id']}"),
    ]:
        assert_problem(client.request(method, path, headers=auth(BOB)), 404, mine["id"], "not found")
    assert present(store.status(mine["id"])).status == "queued" and not store.is_cancelled(mine["id"])

    # The owner can cancel it.
    assert client.delete(f"/v1/jobs/{mine['id']}", headers=auth(ALICE)).json()["status"] == "cancelled"


def test_listing_is_filtered_by_key_and_an_admin_sees_all(client: TestClient) -> None:
    alice = [submit(client, ALICE)["id"]]
    bob = [submit(client, BOB)["id"] for _ in range(2)]

    page = client.get("/v1/jobs", headers=auth(ALICE)).json()
    assert [item["id"] for item in page["items"]] == alice and page["total"] == 1
    page = client.get("/v1/jobs", headers=auth(BOB)).json()
    assert [item["id"] for item in page["items"]] == bob[::-1] and page["total"] == 2
    paged = client.get("/v1/jobs", params={"offset": 1, "limit": 1}, headers=auth(BOB)).json()
    assert [item["id"] for item in paged["items"]] == [bob[0]] and paged["total"] == 2

    everything = client.get("/v1/jobs", headers=auth(ROOT)).json()
    assert everything["total"] == 3
    assert {item["id"]: item["owner"] for item in everything["items"]} == {
        alice[0]: "alice",
        bob[0]: "bob",
        bob[1]: "bob",
    }


def test_an_admin_reads_and_cancels_any_job(client: TestClient, store: JobStore) -> None:
    job = submit(client, BOB)
    assert client.get(f"/v1/jobs/{job['id']}", headers=auth(ROOT)).json()["owner"] == "bob"
    assert_problem(client.get(f"/v1/jobs/{job['id']}/result", headers=auth(ROOT)), 409, "queued")
    assert client.delete(f"/v1/jobs/{job['id']}", headers=auth(ROOT)).json()["status"] == "cancelled"
    # Jobs created before auth existed have no owner: only admins see them.
    legacy = store.create(present(store.spec(job["id"])), 1)
    assert_problem(client.get(f"/v1/jobs/{legacy.id}", headers=auth(ALICE)), 404)
    assert client.get(f"/v1/jobs/{legacy.id}", headers=auth(ROOT)).status_code == 200


# --- the Redis key ring ----------------------------------------------------------------------------------------


def test_key_ring_keys_work_until_revoked_and_only_digests_are_stored(
    client: TestClient, settings: Settings, redis_url: str
) -> None:
    raw = redis.Redis.from_url(redis_url)
    ring = KeyRing(raw, settings.key_prefix)
    key = ring.create("carol")
    job = submit(client, key)
    assert job["owner"] == "carol"

    stored = bytes_hash(raw.hgetall(keys_hash(settings.key_prefix)))
    assert list(stored) == [key_digest(key).encode()]
    assert key.encode() not in b"".join([*stored, *stored.values()])
    assert json.loads(stored[key_digest(key).encode()])["name"] == "carol"

    with pytest.raises(ValueError, match="exists already"):
        ring.create("carol")
    with pytest.raises(ValueError, match="invalid key name"):
        ring.create("has:colon")

    assert ring.revoke("carol") == 1
    assert_unauthorized(client.get("/v1/jobs", headers=auth(key)), "unknown or revoked")
    assert ring.revoke("carol") == 0
    raw.close()


def test_keys_cli_creates_lists_and_revokes(client: TestClient, settings: Settings, monkeypatch: Any) -> None:
    monkeypatch.setenv("REDIS_URL", settings.redis_url)
    monkeypatch.setenv("HYDRA_KEY_PREFIX", settings.key_prefix)
    runner = CliRunner()

    created = runner.invoke(cli_app, ["keys", "create", "dave", "--admin"])
    assert created.exit_code == 0, created.output
    key = created.stdout.strip()
    assert key.startswith("hk_") and len(key) > 40
    assert client.get("/v1/jobs", headers=auth(key)).status_code == 200
    other = submit(client, ALICE)
    assert client.get(f"/v1/jobs/{other['id']}", headers=auth(key)).status_code == 200  # an admin key

    listed = runner.invoke(cli_app, ["keys", "list"])
    assert listed.exit_code == 0 and "dave" in listed.stdout and "admin" in listed.stdout
    assert key not in listed.stdout

    again = runner.invoke(cli_app, ["keys", "create", "dave"])
    assert again.exit_code == 1 and "exists already" in again.output

    revoked = runner.invoke(cli_app, ["keys", "revoke", "dave"])
    assert revoked.exit_code == 0, revoked.output
    assert_unauthorized(client.get("/v1/jobs", headers=auth(key)))
    missing = runner.invoke(cli_app, ["keys", "revoke", "dave"])
    assert missing.exit_code == 1 and "no key named 'dave'" in missing.output


def test_keys_cli_reports_an_unreachable_redis(monkeypatch: Any) -> None:
    from service.core.embedded_redis import free_port

    monkeypatch.setenv("REDIS_URL", f"redis://127.0.0.1:{free_port()}/0")
    result = CliRunner().invoke(cli_app, ["keys", "list"])
    assert result.exit_code == 1 and "cannot use Redis" in result.output


# --- configuration -------------------------------------------------------------------------------------------


def test_env_keys_are_parsed_and_hashed() -> None:
    parsed = parse_api_keys(" alice:k1 , root:k2:admin ,")
    assert {p.name: p.admin for p in parsed.values()} == {"alice": False, "root": True}
    assert set(parsed) == {key_digest("k1"), key_digest("k2")}
    for bad in ("alice", "alice:", "alice:k:owner", "bad name:k", "local:k"):
        with pytest.raises(ValueError):
            parse_api_keys(bad)


def test_auth_off_must_be_confirmed(settings: Settings, store: JobStore, monkeypatch: Any) -> None:
    with pytest.raises(RuntimeError, match="HYDRA_ALLOW_NO_AUTH=1"):
        create_app(replace(settings, auth_enabled=False))

    monkeypatch.setenv("HYDRA_AUTH", "off")
    monkeypatch.delenv("HYDRA_ALLOW_NO_AUTH", raising=False)
    assert Settings.from_env().auth_enabled is False
    with pytest.raises(RuntimeError, match="HYDRA_ALLOW_NO_AUTH"):
        create_app(replace(Settings.from_env(), redis_url=settings.redis_url))
    monkeypatch.setenv("HYDRA_AUTH", "maybe")
    with pytest.raises(ValueError, match="HYDRA_AUTH"):
        Settings.from_env()

    # Confirmed: no key needed, every job is owned by "local", who sees every job.
    with TestClient(create_app(settings)) as keyed:
        earlier = submit(keyed, ALICE)
    with TestClient(create_app(replace(settings, auth_enabled=False, allow_no_auth=True))) as client:
        job = client.post("/v1/jobs", json=JOB).json()
        assert job["owner"] == "local"
        assert client.get(f"/v1/jobs/{earlier['id']}").json()["owner"] == "alice"
        assert client.get("/v1/jobs").json()["total"] == 2


def test_openapi_declares_the_api_key_scheme(client: TestClient) -> None:
    schema = client.get("/schema/openapi.json").json()
    assert schema["components"]["securitySchemes"]["ApiKey"] == {
        "type": "apiKey",
        "name": "X-API-Key",
        "in": "header",
        "description": schema["components"]["securitySchemes"]["ApiKey"]["description"],
    }
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            protected = path.startswith(("/v1/jobs", "/v1/webhooks"))
            assert operation.get("security") == ([{"ApiKey": []}] if protected else None), (method, path)
            if protected:
                assert {"401", "429"} <= operation["responses"].keys(), (method, path)


def test_env_does_not_leak_plain_keys_into_settings_repr(monkeypatch: Any) -> None:
    monkeypatch.setenv("HYDRA_API_KEYS", "alice:super-secret")
    assert "super-secret" not in repr(Settings.from_env())
    assert os.environ["HYDRA_API_KEYS"]  # the environment itself is the operator's business
