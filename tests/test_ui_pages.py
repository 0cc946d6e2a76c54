"""The web page's routes with bad input and without a browser: a real app and Redis, no worker needed.

Every page error is an HTML page with the right status (never a 500, never problem+json): bad form values, a
missing or wrong CSRF token, unknown or another key's job ids, bad compare selections, unknown figures and formats.
Also: the session cookie's attributes, revoked keys ending sessions, no key asked with auth off, deleting jobs.
"""

from __future__ import annotations

import html
import re
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from litestar.testing import TestClient

from hydra_ablate_client.wire import ModelInfo
from service.api.app import create_app
from service.api.ui.session import COOKIE_NAME
from service.core.api_keys import KeyRing
from service.core.settings import Settings
from service.core.store import JobStore
from tests.conftest import private_settings

ALICE, BOB = "alice-pages-key-0123456789", "bob-pages-key-0123456789"
TINY = ModelInfo(id="tiny", architecture="llama", n_layers=3, n_heads=4, n_kv_heads=2, d_model=64, vocab_size=100,
                 parallel_blocks=False, source="local")  # fmt: skip


@pytest.fixture()
def settings(redis_url: str) -> Iterator[Settings]:
    with private_settings(redis_url, "ui", api_keys=f"alice:{ALICE},bob:{BOB}") as made:
        yield made  # type: ignore[misc]


@pytest.fixture()
def store(settings: Settings) -> Iterator[JobStore]:
    made = JobStore.from_settings(settings)
    # What a worker serving a 3-layer model advertises: the submit form is checked against it.
    made.advertise_model(TINY, ttl_s=600)
    yield made
    made.close()


def client_for(settings: Settings, base_url: str = "http://testserver.local") -> TestClient[Any]:
    return TestClient(create_app(settings), base_url=base_url)


def csrf(page: str) -> str:
    match = re.search(r'name="csrf_token" value="([^"]+)"', page)
    assert match, page[:500]
    return match.group(1)


def sign_in(client: TestClient[Any], key: str) -> str:
    """Signs the client's session in; returns the signed-in session's CSRF token."""
    token = csrf(client.get("/ui/login").text)
    reply = client.post("/ui/login", data={"csrf_token": token, "api_key": key, "next": "/ui/jobs"})
    assert reply.status_code == 200 and "Signed in as" in reply.text
    return csrf(client.get("/ui/submit").text)


def error_at(page: str, field: str) -> str:
    match = re.search(rf'id="{field}-error"[^>]*>([^<]*)<', page)
    assert match, f"no error shown at {field}"
    return match.group(1)


def queued_job(store: JobStore, settings: Settings, owner: str) -> str:
    from hydra_ablate_client.wire import JobRequest
    from service.core.resolve import resolve

    spec = resolve(JobRequest(model="tiny", prompts=["a b", "c d"]), {"tiny": TINY}, settings)
    return store.create(spec, 12, owner).id


def test_pages_ask_for_a_key_once_and_keep_a_strict_session_cookie(settings: Settings, store: JobStore) -> None:
    with client_for(settings) as client:
        reply = client.get("/ui/jobs", follow_redirects=False)
        assert reply.status_code == 303 and reply.headers["location"] == "/ui/login?next=%2Fui%2Fjobs"
        login = client.get("/ui/login")
        cookie = login.headers["set-cookie"]
        assert f"{COOKIE_NAME}=" in cookie and "HttpOnly" in cookie and "SameSite=strict" in cookie
        assert "Secure" not in cookie  # plain HTTP here; over HTTPS it is Secure (next test)
        wrong = client.post("/ui/login", data={"csrf_token": csrf(login.text), "api_key": "nope", "next": "/ui/jobs"})
        assert wrong.status_code == 401 and "unknown or was revoked" in wrong.text
        sign_in(client, ALICE)
        assert client.get("/ui/jobs").status_code == 200
        # The key itself is nowhere in Redis, only digests.
        raw = redis.Redis.from_url(settings.redis_url)
        assert not any(ALICE.encode() in (raw.dump(k) or b"") for k in raw.scan_iter(f"{settings.key_prefix}*"))
        raw.close()


def test_cookie_is_secure_over_https(settings: Settings) -> None:
    with client_for(settings, base_url="https://testserver.local") as client:
        assert "Secure" in client.get("/ui/login").headers["set-cookie"]


def test_a_revoked_key_ends_its_sessions(settings: Settings) -> None:
    ring = KeyRing(redis.Redis.from_url(settings.redis_url), settings.key_prefix)
    key = ring.create("carol")
    with client_for(settings) as client:
        sign_in(client, key)
        assert client.get("/ui/jobs", follow_redirects=False).status_code == 200
        ring.revoke("carol")
        assert client.get("/ui/jobs", follow_redirects=False).status_code == 303
    ring.client.close()


def test_no_key_is_asked_with_auth_off(redis_url: str) -> None:
    local_settings = private_settings(redis_url, "ui-local", auth_enabled=False, allow_no_auth=True)
    with local_settings as local, client_for(local) as client:  # type: ignore[arg-type]
        page = client.get("/ui/jobs", follow_redirects=False)
        assert page.status_code == 200 and "Local mode" in page.text
        assert client.get("/ui/login", follow_redirects=False).headers["location"] == "/ui/jobs"


@pytest.mark.parametrize("path", ["/ui/login", "/ui/logout", "/ui/submit", "/ui/jobs/x/cancel", "/ui/jobs/x/delete"])
def test_forms_without_the_csrf_token_are_refused(settings: Settings, store: JobStore, path: str) -> None:
    with client_for(settings) as client:
        sign_in(client, ALICE)
        for data in ({}, {"csrf_token": "forged"}):
            reply = client.post(path, data={**data, "api_key": ALICE, "model": "tiny", "prompts": "a"})
            assert reply.status_code == 403, (path, reply.status_code)
            assert reply.headers["content-type"].startswith("text/html") and "security token" in reply.text
        as_json = client.post(path, json={"csrf_token": "x"})
        assert as_json.status_code == 403


@pytest.mark.parametrize(
    ("form", "status", "field", "message"),
    [
        ({"resample_samples": "lots"}, 400, "resample_samples", "Expected `int`, got `str` - at `$.resample_samples`"),
        ({"seed": "-1"}, 400, "seed", "Expected `int` >= 0 - at `$.seed`"),
        ({"components": "attn, bogus"}, 400, "components", "at `$.components[1]`"),
        ({"prompts": ""}, 400, "prompts", "Expected `array` of length >= 1 - at `$.prompts`"),
        ({"source": "dataset", "dataset_limit": "0"}, 400, "dataset_limit", "Expected `int` >= 1"),
        ({"source": "dataset", "dataset_relation": "capital"}, 400, "dataset_relation", "at `$.dataset.relation`"),
        ({"ablation": "explode"}, 400, "ablation", "Invalid enum value 'explode' - at `$.ablation`"),
        ({"model": "gpt-5"}, 422, "model", "unknown model 'gpt-5'"),
        ({"components": "head.7.0"}, 422, "components", "layer 7"),
        ({"prompts": "only one"}, 422, "prompts", "ablation resample needs at least 2 prompts"),
        ({"resample_samples": "5"}, 422, "resample_samples", "resample_samples 5 is too many for 2 prompts"),
        ({"source": "dataset", "dataset_relation": "P999999"}, 422, "source", "P999999"),
        ({"knockouts": "attn.0 mlp.0\nmlp.1, mlp.1"}, 422, "knockouts", "knockout set 1 names 'mlp.1' twice"),
        ({"knockouts": "attn.0 mlp.0", "estimates_atp": "1"}, 422, "estimates", "not knockout sets"),
        ({"verify_top": "2"}, 422, "verify", "add estimates"),
        ({"estimates_atp": "1", "verify_top": "-1"}, 422, "verify", "use 0 or more"),
        ({"estimates_atp": "1", "verify_top": "0", "verify_random": "0"}, 422, "verify", "nothing would run exactly"),
        ({"estimates_atp": "1", "verify_top": "5", "verify_random": "2"}, 422, "verify",
         "top 5 + random 2 = 7 components, but the job has 6"),
        ({"estimates_atp": "1", "verify_top": "lots"}, 400, "verify_top",
         "Expected `int`, got `str` - at `$.verify.top`"),
        ({"estimates_atp": "1", "verify_random": "1.5"}, 400, "verify_random", "at `$.verify.random`"),
    ],
)
def test_bad_form_values_come_back_with_the_apis_message_at_the_field(
    settings: Settings, store: JobStore, form: dict[str, str], status: int, field: str, message: str
) -> None:
    with client_for(settings) as client:
        token = sign_in(client, ALICE)
        body = {"csrf_token": token, "model": "tiny", "source": "prompts", "prompts": "a b\nc d", **form}
        reply = client.post("/ui/submit", data=body)
        assert reply.status_code == status, reply.text[:2000]
        shown = error_at(reply.text, field).replace("&#39;", "'").replace("&lt;", "<").replace("&gt;", ">")
        assert message in shown, shown
        assert 'aria-invalid="true"' in reply.text and f'aria-describedby="{field}-error"' in reply.text
        for name, value in form.items():  # what the user typed is still there to correct
            assert value in reply.text, name


def test_a_good_form_queues_the_job_for_its_key_only(settings: Settings, store: JobStore) -> None:
    with client_for(settings) as client:
        token = sign_in(client, ALICE)
        body = {"csrf_token": token, "model": "tiny", "source": "prompts", "prompts": "a b\nc d",
                "components": "attn.0, mlp", "resample_samples": "1"}  # fmt: skip
        reply = client.post("/ui/submit", data=body, follow_redirects=False)
        assert reply.status_code == 303
        job_id = reply.headers["location"].rsplit("/", 1)[-1]
        status = store.status(job_id)
        assert status is not None and status.owner == "alice" and status.status == "queued"
        assert store.spec(job_id).components == ["attn.0", "mlp.0", "mlp.1", "mlp.2"]  # type: ignore[union-attr]
        page = client.get(f"/ui/jobs/{job_id}")
        assert page.status_code == 200 and 'id="cancel-job"' in page.text
        progress = client.get(f"/ui/progress?ids={job_id},unknown").json()
        assert progress["jobs"] == [{"id": job_id, "status": "queued", "done": 0, "total": 8, "percent": 0}]
    with client_for(settings) as other:
        sign_in(other, BOB)
        assert job_id not in other.get("/ui/jobs").text
        assert other.get(f"/ui/progress?ids={job_id}").json()["jobs"] == []


def test_the_form_queues_knockout_sets_and_only_those_when_components_is_empty(
    settings: Settings, store: JobStore
) -> None:
    with client_for(settings) as client:
        token = sign_in(client, ALICE)
        body = {"csrf_token": token, "model": "tiny", "source": "prompts", "prompts": "a b\nc d", "components": "",
                "knockouts": "attn.0, mlp.0\n\nmlp.1+mlp.2", "resample_samples": "1"}  # fmt: skip
        reply = client.post("/ui/submit", data=body, follow_redirects=False)
        assert reply.status_code == 303, reply.text[:2000]
        spec = store.spec(reply.headers["location"].rsplit("/", 1)[-1])
        assert spec is not None and spec.components == []
        assert spec.knockouts == [["attn.0", "mlp.0"], ["mlp.1", "mlp.2"]]


def test_the_form_asks_for_the_estimates_ticked(settings: Settings, store: JobStore) -> None:
    with client_for(settings) as client:
        token = sign_in(client, ALICE)
        page = client.get("/ui/submit").text
        assert 'name="estimates_atp"' in page and 'name="estimates_atp_star"' in page
        body = {"csrf_token": token, "model": "tiny", "source": "prompts", "prompts": "a b\nc d",
                "components": "attn", "estimates_atp_star": "1", "estimates_atp": "1", "resample_samples": "1"}
        reply = client.post("/ui/submit", data=body, follow_redirects=False)
        assert reply.status_code == 303, reply.text[:2000]
        spec = store.spec(reply.headers["location"].rsplit("/", 1)[-1])
        assert spec is not None and spec.estimates == ["atp", "atp_star"]


@pytest.mark.parametrize(
    ("form", "verify"),
    [({"verify_top": "2"}, (2, 0)), ({"verify_random": " 1 "}, (0, 1)),
     ({"verify_top": "1", "verify_random": "3"}, (1, 3)), ({}, None)],
)
def test_the_form_asks_for_a_verification_set(
    settings: Settings, store: JobStore, form: dict[str, str], verify: tuple[int, int] | None
) -> None:
    """Either box filled sends `verify` (the other one counting 0); both empty, none."""
    with client_for(settings) as client:
        token = sign_in(client, ALICE)
        page = client.get("/ui/submit").text
        assert 'name="verify_top"' in page and 'name="verify_random"' in page
        body = {"csrf_token": token, "model": "tiny", "source": "prompts", "prompts": "a b\nc d",
                "components": "attn, mlp", "estimates_atp": "1", "resample_samples": "1", "verify_top": "",
                "verify_random": "", **form}  # six components
        reply = client.post("/ui/submit", data=body, follow_redirects=False)
        assert reply.status_code == 303, reply.text[:2000]
        spec = store.spec(reply.headers["location"].rsplit("/", 1)[-1])
        assert spec is not None and spec.estimates == ["atp"]
        assert (None if spec.verify is None else (spec.verify.top, spec.verify.random)) == verify


@pytest.mark.parametrize("verify", [{"top": 5, "random": 2}, {"top": -1, "random": 0}, {"top": 0, "random": 0}])
def test_the_forms_verify_message_is_the_apis(settings: Settings, store: JobStore, verify: dict[str, int]) -> None:
    """The page shows, at the verify boxes, the very detail of the API's 422 for the same job."""
    job = {"model": "tiny", "prompts": ["a b", "c d"], "estimates": ["atp"], "verify": verify}
    with client_for(settings) as client:
        api = client.post("/v1/jobs", json=job, headers={"X-API-Key": ALICE})
        assert api.status_code == 422 and api.json()["field"] == "verify", api.text
        token = sign_in(client, ALICE)
        body = {"csrf_token": token, "model": "tiny", "source": "prompts", "prompts": "a b\nc d", "estimates_atp": "1",
                "verify_top": str(verify["top"]), "verify_random": str(verify["random"])}
        reply = client.post("/ui/submit", data=body)
        assert reply.status_code == 422
        assert html.unescape(error_at(reply.text, "verify")) == api.json()["detail"]


def test_unknown_and_other_keys_job_ids_are_404_pages(settings: Settings, store: JobStore) -> None:
    alices = queued_job(store, settings, "alice")
    with client_for(settings) as client:
        token = sign_in(client, BOB)
        for job_id in ("0" * 32, alices, "not-an-id", "..%2F..%2Fetc"):
            for path in (
                f"/ui/jobs/{job_id}",
                f"/ui/jobs/{job_id}/figures/te_vs_de",
                f"/ui/jobs/{job_id}/download/csv",
            ):
                reply = client.get(path)
                assert reply.status_code == 404, (path, reply.status_code)
                if "%" not in job_id:  # an encoded slash matches no page route: the router's own 404 answers
                    assert reply.headers["content-type"].startswith("text/html")
            for action in ("cancel", "delete"):
                assert client.post(f"/ui/jobs/{job_id}/{action}", data={"csrf_token": token}).status_code == 404
        assert store.status(alices).status == "queued"  # type: ignore[union-attr]  # bob's cancel changed nothing


def test_figures_downloads_and_compare_refuse_what_is_not_there(settings: Settings, store: JobStore) -> None:
    job_id = queued_job(store, settings, "alice")
    with client_for(settings) as client:
        sign_in(client, ALICE)
        assert client.get(f"/ui/jobs/{job_id}/figures/nonsense").status_code == 404
        assert client.get(f"/ui/jobs/{job_id}/download/xlsx").status_code == 404
        assert client.get(f"/ui/jobs/{job_id}/figures/te_vs_de").status_code == 409  # not finished
        assert client.get(f"/ui/jobs/{job_id}/download/csv").status_code == 409
        assert client.get("/ui/compare").status_code == 400
        assert client.get(f"/ui/compare?ids={job_id}").status_code == 400
        assert client.get(f"/ui/compare?ids={job_id}&ids={job_id}").status_code == 400  # one job, twice
        assert client.get(f"/ui/compare?ids={job_id}&ids=other").status_code == 404
        many = "&".join(f"ids=j{i}" for i in range(20))
        assert client.get(f"/ui/compare?{many}").status_code == 400
        assert client.get(f"/ui/compare/figure?ids={job_id}&ids=other").status_code == 404
        assert client.get("/ui/jobs?status=bogus&model=%00&tag=" + "x" * 5000).status_code == 200
        assert client.get("/ui/login?next=https://evil.example/").status_code == 200
        assert 'value="/ui/jobs"' in client.get("/ui/login?next=//evil.example/ui/").text


def test_cancel_then_delete_from_the_page(settings: Settings, store: JobStore) -> None:
    job_id = queued_job(store, settings, "alice")
    with client_for(settings) as client:
        token = sign_in(client, ALICE)
        early = client.post(f"/ui/jobs/{job_id}/delete", data={"csrf_token": token})
        assert early.status_code == 409 and "cancel it first" in early.text
        cancelled = client.post(f"/ui/jobs/{job_id}/cancel", data={"csrf_token": token}, follow_redirects=False)
        assert cancelled.status_code == 303 and store.status(job_id).status == "cancelled"  # type: ignore[union-attr]
        again = client.post(f"/ui/jobs/{job_id}/cancel", data={"csrf_token": token})
        assert again.status_code == 200  # already cancelled: the API's answer is the cancelled job, shown again
        deleted = client.post(f"/ui/jobs/{job_id}/delete", data={"csrf_token": token}, follow_redirects=False)
        assert deleted.status_code == 303 and deleted.headers["location"] == "/ui/jobs"
        assert store.status(job_id) is None and job_id not in client.get("/ui/jobs").text
        left = [k for k in store.client.scan_iter(f"{settings.key_prefix}*") if job_id.encode() in k]
        assert left == []
        assert client.post(f"/ui/jobs/{job_id}/delete", data={"csrf_token": token}).status_code == 404


def test_page_writes_count_against_the_keys_rate_limit(redis_url: str) -> None:
    with private_settings(redis_url, "ui-rate", api_keys=f"alice:{ALICE}", rate_limit_write=2) as limited:
        store = JobStore.from_settings(limited)  # type: ignore[arg-type]
        job_id = queued_job(store, limited, "alice")  # type: ignore[arg-type]
        with client_for(limited) as client:  # type: ignore[arg-type]
            token = sign_in(client, ALICE)
            answers = [
                client.post(f"/ui/jobs/{job_id}/cancel", data={"csrf_token": token}).status_code for _ in range(3)
            ]
            assert answers == [200, 200, 429]
            refused = client.post(f"/ui/jobs/{job_id}/delete", data={"csrf_token": token})
            assert (
                refused.status_code == 429 and "rate limit" in refused.text and int(refused.headers["retry-after"]) > 0
            )
        store.close()


def _succeeded(store: JobStore, result: Any, owner: str) -> str:
    import msgspec

    status = store.create(result.provenance.spec, total=len(result.prompts) * len(result.components), owner=owner)
    assert store.mark_running(status.id)
    assert store.mark_succeeded(status.id, msgspec.json.encode(msgspec.structs.replace(result, id=status.id)))
    return status.id


def test_compare_page_leads_with_ce_on_unembed_and_the_ablations_efficacy(settings: Settings, store: JobStore) -> None:
    """Per component: the CE-on-Δunembed slope with its interval, whether the whole interval lies in (0, 1), and the
    share of Δunembed the ablation removed (weak flagged); the older regressions come after it, labelled."""
    import msgspec

    from tests.test_figures import build_result

    first = build_result(seed=1)
    # Efficacy as a worker with ablated_unembed_effect reports it: attn.0 removed 20% (weak), the others 90%.
    components = [msgspec.structs.replace(s, unembed_removed_share=0.2 if s.component == "attn.0" else 0.9,
                                          weak_ablation=s.component == "attn.0") for s in first.summary.components]
    first = msgspec.structs.replace(first, summary=msgspec.structs.replace(first.summary, components=components))
    second = build_result(seed=2)
    ids = [_succeeded(store, result, "alice") for result in (first, second)]
    with client_for(settings) as client:
        sign_in(client, ALICE)
        page = client.get(f"/ui/compare?ids={ids[0]}&ids={ids[1]}")
        assert page.status_code == 200
        html = page.text
        figure = client.get(f"/ui/compare/figure?ids={ids[0]}&ids={ids[1]}")
        assert figure.status_code == 200 and figure.content.startswith(b"\x89PNG")
    paper = html[html.index('id="compare-paper"'):]
    paper = paper[paper.index("</caption>"):paper.index("</table>")]
    for result in (first, second):
        for s in result.summary.components:
            f = s.ce_vs_unembed
            assert f is not None and f.slope is not None
            assert f"{f.slope:.2f} [{f.slope_ci_low:.2f}, {f.slope_ci_high:.2f}]" in paper, s.component
    inside = [sum(1 for s in r.summary.components if s.ce_vs_unembed and s.ce_vs_unembed.slope_in_unit_interval)
              for r in (first, second)]
    assert paper.count("not in (0, 1)") == 12 - sum(inside)
    assert paper.count("in (0, 1)") == 12  # every cell says one or the other
    assert paper.count("removed 90%") == 5 and paper.count("removed 20% <strong>weak</strong>") == 1
    assert paper.count("removed –") == 6  # the second job reports no efficacy: a dash, not a number
    jobs = html[html.index('id="compare-jobs"'):]
    jobs = jobs[:jobs.index("</table>")]
    assert f"{inside[0]} of 6" in jobs and f"{inside[1]} of 6" in jobs and "1 of 6 (removed &lt; 50%)" in jobs
    # The paper's statistic comes first; the older regressions after it, labelled as such.
    assert jobs.index("whole interval in (0, 1)") < jobs.index("Older: TE on DE slope")
    assert html.index('id="compare-paper"') < html.index("older regression: compensation-on-DE slope")
