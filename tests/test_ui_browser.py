"""The web page in a real headless Chromium against a real API (uvicorn), Redis and Celery worker (tiny models).

One browser walks the lab's day: sign in with a key, submit a job through the form (after a bad value the form
shows the API's message at the field), watch the job's progress bar reach 100%, open the job and see every figure
that applies to it load, download the CSV, cancel a second job, compare two finished jobs; open an ablation job
with knockout sets and two activation-patching jobs and see their own figures load, compare the patching jobs, and
be told why a patching job does not compare with an ablation job; then a second key's session sees none of the
first key's jobs. Screenshots of every page go to a temporary folder (printed; set HYDRA_UI_SCREENSHOTS to keep
them somewhere else).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest

from hydra_ablate_client.wire import JobResult
from service.api.app import create_app
from service.rendering.exports import CSV_COLUMNS
from service.rendering.figures import shown_figures
from tests.browser import browser_binaries, chromium, full_page_screenshot, serve, wait_for
from tests.patch_fixtures import tiny_ioi, wire_pairs

pytestmark = pytest.mark.skipif(
    browser_binaries() is None,
    reason="needs Debian's chromium and chromium-driver (scripts/setup.sh installs them when run as root)",
)

ALICE_KEY, BOB_KEY = "alice-ui-key-0123456789", "bob-ui-key-0123456789"


@pytest.fixture(scope="module")
def base_url(celery_worker: object, stack_env: dict[str, str]) -> Iterator[str]:
    """The test stack's API with auth on and two keys, served over real HTTP."""
    from service.core.settings import Settings

    settings = dataclasses.replace(Settings.from_env(), auth_enabled=True, api_keys=f"alice:{ALICE_KEY},bob:{BOB_KEY}")
    with serve(create_app(settings)) as url:
        yield url


@pytest.fixture()
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = Path(os.environ.get("HYDRA_UI_SCREENSHOTS") or tmp_path_factory.mktemp("ui-screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    print(f"screenshots in {folder}")
    return folder


@pytest.fixture()
def browser(tmp_path: Path) -> Iterator[Any]:
    driver = chromium(tmp_path / "downloads")
    try:
        yield driver
    finally:
        driver.quit()


def sign_in(driver: Any, base_url: str, key: str) -> None:
    from selenium.webdriver.common.keys import Keys

    driver.delete_all_cookies()
    driver.get(f"{base_url}/ui/jobs")
    wait_for(lambda: "/ui/login" in driver.current_url, 10, "the sign-in page")
    # Keyboard only: the key field has focus on arrival, Enter submits.
    assert driver.switch_to.active_element.get_attribute("id") == "api_key"
    driver.switch_to.active_element.send_keys(key + Keys.ENTER)
    wait_for(lambda: driver.current_url.endswith("/ui/jobs"), 10, "the jobs page after signing in")


def fill(driver: Any, field_id: str, value: str) -> None:
    from selenium.webdriver.common.by import By

    element = driver.find_element(By.ID, field_id)
    element.clear()
    element.send_keys(value)


def select(driver: Any, field_id: str, value: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    Select(driver.find_element(By.ID, field_id)).select_by_value(value)


def images_loaded(driver: Any, selector: str) -> list[int]:
    """naturalWidth of every image matching `selector` once all have finished loading, else []."""
    widths = driver.execute_script(
        "const imgs = [...document.querySelectorAll(arguments[0])];"
        "return imgs.every(i => i.complete) ? imgs.map(i => i.naturalWidth) : null;",
        selector,
    )
    return widths or []


def job_id_from(driver: Any) -> str:
    return str(driver.current_url.rstrip("/").rsplit("/", 1)[-1])


def submit_form(driver: Any, base_url: str, prompts: str | None, samples: str, dataset_limit: str | None = None,
                components: str = "attn, mlp") -> None:  # fmt: skip
    from selenium.webdriver.common.by import By

    driver.get(f"{base_url}/ui/submit")
    select(driver, "model", "tiny-llama")
    if prompts is not None:
        fill(driver, "prompts", prompts)
    else:
        driver.find_element(By.ID, "source-dataset").click()
        fill(driver, "dataset_limit", dataset_limit or "")
    fill(driver, "components", components)
    fill(driver, "resample_samples", samples)
    driver.find_element(By.CSS_SELECTOR, "form.submit button[type=submit]").click()


def api_result(base_url: str, job_id: str) -> JobResult:
    reply = httpx.get(f"{base_url}/v1/jobs/{job_id}/result", headers={"X-API-Key": ALICE_KEY}, timeout=60)
    return msgspec.json.decode(reply.raise_for_status().content, type=JobResult)


def finished_via_api(base_url: str, body: dict[str, Any]) -> str:
    """A job submitted through the API and waited for; its id."""
    job_id = str(httpx.post(f"{base_url}/v1/jobs", json=body, headers={"X-API-Key": ALICE_KEY}).json()["id"])

    def done() -> bool:
        reply = httpx.get(f"{base_url}/v1/jobs/{job_id}", headers={"X-API-Key": ALICE_KEY}).json()
        assert reply["status"] in ("queued", "running", "succeeded"), reply
        return reply["status"] == "succeeded"

    wait_for(done, 120, f"job {job_id}")
    return job_id


def figures_load(driver: Any, base_url: str, job_id: str) -> list[str]:
    """Opens the job's page: the figures shown are those that apply to its result, each image loaded (natural width
    > 0); their names."""
    from selenium.webdriver.common.by import By

    driver.get(f"{base_url}/ui/jobs/{job_id}")
    wait_for(lambda: driver.find_elements(By.ID, "h-figures"), 20, "the finished job's figures section")
    widths = wait_for(lambda: images_loaded(driver, "img[data-figure]"), 60, "the figures to load")
    names = [img.get_attribute("data-figure") for img in driver.find_elements(By.CSS_SELECTOR, "img[data-figure]")]
    assert names == list(shown_figures(api_result(base_url, job_id))), names
    assert len(widths) == len(names) and all(w > 0 for w in widths), dict(zip(names, widths, strict=False))
    return names


def test_the_lab_day_in_a_browser(
    browser: Any, base_url: str, shots: Path, tmp_path: Path, llama: tuple[Any, Any]
) -> None:
    from selenium.webdriver.common.by import By

    driver = browser
    driver.get(f"{base_url}/ui/jobs")
    wait_for(lambda: "/ui/login" in driver.current_url, 10, "a redirect to the sign-in page")
    full_page_screenshot(driver, shots / "login.png")
    sign_in(driver, base_url, ALICE_KEY)

    # A bad value: the form comes back with the API's own message next to the field, the other values kept.
    prompts = "\n".join(f"Fact number {i} about the city of" for i in range(40))
    submit_form(driver, base_url, prompts, samples="many")
    # The click returns before the answer has replaced the page: wait for the message rather than read the old page.
    error = wait_for(
        lambda: next(iter(driver.find_elements(By.ID, "resample_samples-error")), None), 20, "the field's message"
    ).text
    assert "Expected `int`, got `str` - at `$.resample_samples`" in error
    assert driver.find_element(By.ID, "resample_samples").get_attribute("aria-invalid") == "true"
    assert (
        driver.find_element(By.ID, "prompts").get_attribute("value").splitlines()[0]
        == "Fact number 0 about the city of"
    )
    full_page_screenshot(driver, shots / "submit-error.png")

    # Submitted through the form; the jobs page's bar follows the job to 100%.
    fill(driver, "resample_samples", "3")
    driver.find_element(By.CSS_SELECTOR, "form.submit button[type=submit]").click()
    wait_for(lambda: "/ui/jobs/" in driver.current_url, 20, "the new job's page")
    first = job_id_from(driver)
    driver.get(f"{base_url}/ui/jobs")
    bar = f'progress[data-progress="{first}"]'
    seen: list[str] = []

    def finished() -> bool:
        value = driver.find_element(By.CSS_SELECTOR, bar).get_attribute("value")
        seen.append(value)
        status = driver.find_element(By.CSS_SELECTOR, f'tr[data-job="{first}"] [data-status]').text
        return status == "succeeded" and float(value) == 100

    wait_for(finished, 120, "the job's progress bar to reach 100%")
    assert float(seen[-1]) == 100

    # The job's page: summary, every figure that applies loaded (an ablation job's, less knockout_response: it has
    # no sets), the CSV downloads.
    driver.find_element(By.CSS_SELECTOR, f'a[href="/ui/jobs/{first}"]').click()
    names = figures_load(driver, base_url, first)
    assert "patching_grid" not in names and "knockout_response" not in names and "te_vs_de" in names
    full_page_screenshot(driver, shots / "job.png")
    driver.find_element(By.ID, "download-csv").click()
    downloads = tmp_path / "downloads"
    csv_file: Path = wait_for(lambda: next(iter(downloads.glob("*.csv")), None), 30, "the CSV download")
    wait_for(lambda: not list(downloads.glob("*.crdownload")), 30, "the download to finish")
    rows = list(csv.reader(io.StringIO(csv_file.read_text())))
    assert tuple(rows[0]) == CSV_COLUMNS and len(rows) == 1 + 40 * 6  # 40 prompts × 3 layers × (attn, mlp)

    # A second, long job cancelled from its page.
    submit_form(driver, base_url, None, samples="8", dataset_limit="1000", components="attn, mlp, head")
    wait_for(lambda: "/ui/jobs/" in driver.current_url, 20, "the long job's page")
    second = job_id_from(driver)
    driver.find_element(By.ID, "cancel-job").click()
    wait_for(lambda: driver.find_element(By.CSS_SELECTOR, f'[data-status-of="{second}"]').text == "cancelled", 20,
             "the job to show as cancelled")  # fmt: skip
    status = httpx.get(f"{base_url}/v1/jobs/{second}", headers={"X-API-Key": ALICE_KEY}).json()
    assert status["status"] == "cancelled"

    # A third job (another model, a knockout set) through the API: its page adds knockout_response. Then both
    # finished jobs compared on one page.
    body = {"model": "tiny-gpt2", "prompts": [f"Fact number {i} about the city of" for i in range(10)],
            "components": ["attn", "mlp"], "knockouts": [["attn.0", "mlp.1"]], "resample_samples": 2}  # fmt: skip
    third = finished_via_api(base_url, body)
    assert "knockout_response" in figures_load(driver, base_url, third)
    # An ablation job with attribution-patching estimates: its page draws them too.
    towns = [f"Fact {i} about the town of" for i in range(6)]
    estimated = finished_via_api(base_url, {"model": "tiny-llama", "prompts": towns, "components": ["attn", "mlp"],
                                            "estimates": ["atp"], "resample_samples": 2})  # fmt: skip
    assert "estimates" in figures_load(driver, base_url, estimated)
    tables = [t.get_attribute("id") for t in driver.find_elements(By.CSS_SELECTOR, "#estimates table")]
    assert tables == ["estimates-table", "estimates-misses", "estimates-errors"], tables
    full_page_screenshot(driver, shots / "estimates-job.png")
    driver.get(f"{base_url}/ui/jobs")
    for job_id in (first, third):
        driver.find_element(By.CSS_SELECTOR, f'input[name=ids][value="{job_id}"]').click()
    full_page_screenshot(driver, shots / "jobs.png")
    driver.find_element(By.CSS_SELECTOR, "#compare-form button[type=submit]").click()
    wait_for(lambda: "/ui/compare" in driver.current_url, 20, "the compare page")
    widths = wait_for(lambda: images_loaded(driver, "#compare-figure"), 60, "the comparison figure")
    assert widths == [1200]
    full_page_screenshot(driver, shots / "compare.png")

    # Two activation-patching jobs: their pages show their own figures (patching_grid), they compare with each
    # other, and a patching job with an ablation job gets a page saying why not.
    _, tokenizer = llama
    pairs = wire_pairs(tiny_ioi(tokenizer, 3, seed=2))
    patch = {"model": "tiny-llama", "intervention": "patch", "pairs": pairs, "components": ["resid_pre", "head.1.2"],
             "knockouts": [["attn.0", "mlp.1"]]}  # fmt: skip
    patched = [finished_via_api(base_url, {**patch, "direction": direction}) for direction in ("denoise", "noise")]
    for job_id in patched:
        assert figures_load(driver, base_url, job_id) == ["patching_grid"]
    full_page_screenshot(driver, shots / "patching-job.png")
    driver.get(f"{base_url}/ui/compare?ids={patched[0]}&ids={patched[1]}")
    assert driver.find_element(By.TAG_NAME, "h1").text == "Compare 2 patching jobs"
    widths = wait_for(lambda: images_loaded(driver, "#compare-figure"), 60, "the patching comparison's figure")
    assert widths == [1200]
    full_page_screenshot(driver, shots / "compare-patching.png")
    driver.get(f"{base_url}/ui/compare?ids={patched[0]}&ids={first}")
    assert driver.find_element(By.TAG_NAME, "h1").text == "Error 400"
    assert "compare patching jobs with patching jobs" in driver.find_element(By.CSS_SELECTOR, "p.error").text

    # A narrow window still shows the jobs without sideways scrolling of the page itself.
    driver.set_window_size(420, 800)
    driver.get(f"{base_url}/ui/jobs")
    overflow = driver.execute_script("return document.documentElement.scrollWidth - window.innerWidth")
    assert overflow <= 0, overflow
    full_page_screenshot(driver, shots / "jobs-narrow.png")
    driver.set_window_size(1280, 800)

    # Another key's session: none of alice's jobs listed, and her job's page, figures and downloads are 404.
    sign_in(driver, base_url, BOB_KEY)
    listed = {row.get_attribute("data-job") for row in driver.find_elements(By.CSS_SELECTOR, "tr[data-job]")}
    assert not listed & {first, second, third}
    assert "Signed in as bob" in driver.find_element(By.CSS_SELECTOR, ".who").text
    for path in (f"/ui/jobs/{first}", f"/ui/jobs/{first}/download/csv", f"/ui/compare?ids={first}&ids={third}"):
        driver.get(f"{base_url}{path}")
        assert driver.find_element(By.TAG_NAME, "h1").text == "Error 404", path
