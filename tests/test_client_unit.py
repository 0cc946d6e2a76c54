"""The client side without a server: spec files and flags, rendering of a hand-built result, error mapping.

End-to-end cli/CLI tests against the real stack live elsewhere; everything here runs in milliseconds.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import socket
from pathlib import Path
from typing import Any, ClassVar, cast, get_args, get_type_hints

import httpx
import msgspec
import pytest
from rich.console import Console
from typer.testing import CliRunner

from cli import main
from cli.main import (
    CliFailure,
    app,
    load_spec,
    merge_request,
    render_result,
    split_components,
    to_job_request,
)
from cli.views import models_table, result_csv, result_view
from hydra_ablate_client.http import (
    AsyncHydraClient,
    HydraClient,
    HydraConnectionError,
    HydraError,
    HydraProtocolError,
    _Deadline,
    _finish,
    _job_path,
    _status,
    problem_from_response,
)
from hydra_ablate_client.vocabulary import FIGURE_NAMES, AblationKind, JobState, MetricName, PositionScope, PresetName
from hydra_ablate_client.wire import (
    ComponentSummary,
    DatasetRef,
    JobPage,
    JobRequest,
    JobResult,
    JobSpec,
    JobStatus,
    ModelInfo,
    PairDatasetRef,
    Progress,
    PromptPair,
    PromptResult,
    Provenance,
    Regression,
    Selection,
    Summary,
)
from worker.engine.types import PromptMeasures, SweepResult
from worker.summary import summarise

# --- fixtures: a small, fully hand-built result ---------------------------------------------------------------------


def _prompt(text: str, token: str, te: list[float], de: list[float], norm: list[float]) -> PromptResult:
    comp = [d - t for d, t in zip(de, te, strict=True)]
    return PromptResult(
        index=0,
        prompt=text,
        target_id=42,
        target_token=token,
        clean_metric=7.5,
        top2_gap=1.25,
        near_tie=False,
        sources=[1],
        total_effect=te,
        direct_effect=de,
        compensation=comp,
        norm_response=norm,
        response=[[0.0, c - n] for c, n in zip(comp, norm, strict=True)],
        clean_direct_effect=[0.3, -0.2],
        unembed_effect=de,
        compensatory_effect=[c - n for c, n in zip(comp, norm, strict=True)],
    )


def _paper_fields(name: str, prompts: list[PromptResult]) -> dict[str, Any]:
    """The paper's summary fields of one component, as the service's own summarise computes them."""
    sweep = SweepResult(components=["attn.0", "mlp.0"], response_basis=["attn.0", "mlp.0"],
                        prompts=cast(list[PromptMeasures], prompts))
    summary = next(c for c in summarise(sweep, 1e-4).components if c.component == name)
    old = set(ComponentSummary.__struct_fields__[:11])
    return {f: getattr(summary, f) for f in ComponentSummary.__struct_fields__ if f not in old}


@pytest.fixture
def result() -> JobResult:
    prompts = [
        _prompt("The Eiffel Tower is in the city of", " Paris", te=[0.25, 0.5], de=[0.75, 0.5], norm=[0.125, 0.0]),
        _prompt('He said "hi, there" and', " left", te=[0.5, 1.0], de=[1.25, 1.0], norm=[0.25, 0.0]),
    ]
    components = [
        ComponentSummary(
            component="attn.0",
            direct_effect_mean=1.0,
            direct_effect_se=0.25,
            total_effect_mean=0.375,
            total_effect_se=0.125,
            compensation_mean=0.625,
            compensation_se=0.0625,
            compensation_attn_mean=0.0,
            compensation_mlp_mean=0.4375,
            norm_response_mean=0.1875,
            compensation_vs_direct=Regression(y="compensation", x="direct_effect", slope=0.5, intercept=0.125,
                                              r2=0.875, n=2),
            **_paper_fields("attn.0", prompts),
        ),
        ComponentSummary(
            component="mlp.0",
            direct_effect_mean=0.75,
            direct_effect_se=0.25,
            total_effect_mean=0.75,
            total_effect_se=0.25,
            compensation_mean=0.0,
            compensation_se=0.0,
            compensation_attn_mean=0.0,
            compensation_mlp_mean=0.0,
            norm_response_mean=0.0,
            compensation_vs_direct=Regression(y="compensation", x="direct_effect", slope=None, intercept=None,
                                              r2=None, n=2),
            **_paper_fields("mlp.0", prompts),
        ),
    ]
    spec = JobSpec(
        model="tiny",
        prompts=[p.prompt for p in prompts],
        answers=None,
        counterfactuals=None,
        components=["attn.0", "mlp.0"],
        ablation="resample",
        positions="final",
        metric="centered_logit",
        norm_scale="clean",
        resample_samples=1,
        resample_from="next",
        mean_reference_prompts=None,
        seed=0,
    )
    return JobResult(
        id="job-1",
        model="tiny",
        components=["attn.0", "mlp.0"],
        response_basis=["attn.0", "mlp.0"],
        prompts=prompts,
        summary=Summary(
            n_prompts=2,
            selection=Selection(only_correct=False, n_candidates=2, n_kept=2),
            erasure=[],
            components=components,
            response_matrix=[[0.0, 0.4375], [0.0, 0.0]],
            clean_direct_effect_mean=[0.3, -0.2],
            total_vs_direct=Regression(y="total_effect.mean", x="direct_effect.mean", slope=-1.5, intercept=1.875,
                                       r2=1.0, n=2),
            near_ties=0,
        ),
        provenance=Provenance(
            spec=spec,
            model_id="tiny",
            model_source="memory",
            model_revision=None,
            model_file_sha256=None,
            architecture="LlamaForCausalLM",
            dtype="float32",
            device="cpu",
            library_versions={"torch": "2"},
            seed=0,
            engine="hooks",
            worker="w0",
            elapsed_s=0.5,
        ),
    )


def _text(renderable: object) -> str:
    console = Console(record=True, width=200, no_color=True)
    console.print(renderable)
    return console.export_text()


def _closed_port() -> int:
    """A port nothing listens on: bound then released, so connecting is refused at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --- spec files and flags -------------------------------------------------------------------------------------------


def test_load_spec_reads_yaml_and_json(tmp_path: Path) -> None:
    yaml_file = tmp_path / "job.yaml"
    yaml_file.write_text("preset: hydra\ndataset:\n  name: known_1000\n  limit: 4\nresample_samples: 2\n")
    expected = {"preset": "hydra", "dataset": {"name": "known_1000", "limit": 4}, "resample_samples": 2}
    assert load_spec(yaml_file) == expected
    json_file = tmp_path / "job.json"
    json_file.write_text(json.dumps({"prompts": ["a b", "c d"], "ablation": "zero"}))
    assert load_spec(json_file) == {"prompts": ["a b", "c d"], "ablation": "zero"}
    empty = tmp_path / "empty.yml"
    empty.write_text("")
    assert load_spec(empty) == {}


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("list.yaml", "- a\n- b\n", "must hold a mapping"),
        ("bad.json", "{not json", "not valid JSON"),
        ("bad.yaml", "a: [1, 2\n", "not valid YAML"),
    ],
)
def test_load_spec_rejects_non_mappings(tmp_path: Path, name: str, content: str, message: str) -> None:
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(CliFailure, match=message):
        load_spec(path)


def test_load_spec_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CliFailure, match="cannot read spec file"):
        load_spec(tmp_path / "nope.yaml")


def test_flags_win_over_the_spec_file() -> None:
    spec = {"model": "a", "metric": "logit", "seed": 1, "components": ["attn"], "norm_scale": "ablated"}
    merged = merge_request(spec, model="b", seed=7, components=split_components(" attn.3, mlp ,head.2.1,"))
    assert merged == {
        "model": "b",
        "metric": "logit",
        "seed": 7,
        "components": ["attn.3", "mlp", "head.2.1"],
        "norm_scale": "ablated",
    }
    assert spec["model"] == "a"  # the file's mapping is not modified


def test_prompt_flags_replace_the_files_dataset() -> None:
    merged = merge_request({"dataset": {"name": "known_1000", "limit": 5}, "metric": "logit"}, prompts=["x y", "z w"])
    assert merged == {"prompts": ["x y", "z w"], "metric": "logit"}


def test_dataset_flags_replace_the_files_prompts_and_keep_its_slice() -> None:
    spec = {"prompts": ["a"], "answers": [" b"], "dataset": {"name": "known_1000", "relation": "P36"}}
    merged = merge_request(spec, limit=3, samples=2)
    assert merged == {"dataset": {"name": "known_1000", "relation": "P36", "limit": 3}, "resample_samples": 2}


def test_limit_alone_uses_the_builtin_dataset() -> None:
    merged = merge_request({"preset": "hydra"}, limit=8)
    assert merged == {"preset": "hydra", "dataset": {"name": "known_1000", "limit": 8}}


def test_prompts_and_dataset_flags_conflict() -> None:
    with pytest.raises(CliFailure, match="alternatives"):
        merge_request({}, prompts=["a"], dataset="known_1000")


def test_request_is_checked_against_the_wire_schema() -> None:
    request = to_job_request({"preset": "hydra", "dataset": {"name": "known_1000", "limit": 8}, "resample_samples": 3})
    assert request.preset == "hydra"
    assert request.dataset == DatasetRef(name="known_1000", limit=8)
    assert request.resample_samples == 3
    with pytest.raises(CliFailure, match=r"resample_samples"):
        to_job_request({"resample_samples": 0})
    with pytest.raises(CliFailure, match=r"unknown field `sample`"):
        to_job_request({"sample": 3})


# --- rendering ------------------------------------------------------------------------------------------------------


def test_result_table_shows_each_component(result: JobResult) -> None:
    text = _text(result_view(result))
    attn = next(line for line in text.splitlines() if line.lstrip().startswith("attn.0"))  # its table row
    for cell in ("+1.000 ±0.250", "+0.375 ±0.125", "+0.625 ±0.062", "+0.438", "+0.188"):
        assert cell in attn, (cell, attn)
    fit = next(line for line in text.splitlines() if "attn.0" in line and "compensation on DE" in line)
    assert "+0.500" in fit and "0.875" in fit
    mlp = next(line for line in text.splitlines() if "mlp.0" in line and "compensation on DE" in line)
    assert mlp.count("—") == 3  # no spread in DE: no slope, no interval, no R²
    assert "+0.750 ±0.250" in next(line for line in text.splitlines() if line.lstrip().startswith("mlp.0"))
    assert "tiny: resample ablation, centered_logit, 2 prompts" in text
    assert "mean TE on mean DE across components: slope -1.500, R² 1.000, n=2" in text


def test_result_csv_has_one_row_per_prompt_and_component(result: JobResult) -> None:
    rows = list(csv.DictReader(io.StringIO(result_csv(result))))
    assert [(row["prompt"][:6], row["component"]) for row in rows] == [
        ("The Ei", "attn.0"),
        ("The Ei", "mlp.0"),
        ("He sai", "attn.0"),
        ("He sai", "mlp.0"),
    ]
    quoted = rows[2]
    assert quoted["prompt"] == 'He said "hi, there" and'  # commas and quotes survive the round trip
    assert quoted["target_token"] == " left"
    assert float(quoted["total_effect"]) == 0.5
    assert float(quoted["direct_effect"]) == 1.25
    assert float(quoted["compensation"]) == 0.75
    assert float(quoted["norm_response"]) == 0.25


def test_the_cli_csv_is_the_api_csv(result: JobResult) -> None:
    """One CSV format: `hydra-ablate result --format csv` writes the bytes `GET …/result?format=csv` serves."""
    from service.rendering.exports import CSV_COLUMNS, export

    text = render_result(result, "csv")
    assert text.encode("utf-8") == export(msgspec.json.encode(result), "csv")
    assert text.splitlines()[0].split(",") == list(CSV_COLUMNS)
    assert text.count("\r\n") == text.count("\n") == 1 + len(result.prompts) * len(result.components)


def test_the_cli_writes_csv_files_byte_for_byte(result: JobResult, tmp_path: Path) -> None:
    from cli.main import _write

    path = tmp_path / "r.csv"
    _write(path, render_result(result, "csv"))
    assert path.read_bytes() == render_result(result, "csv").encode("utf-8")


def test_json_output_round_trips(result: JobResult) -> None:
    assert msgspec.json.decode(render_result(result, "json"), type=JobResult) == result


def test_table_output_for_files_is_plain_text(result: JobResult) -> None:
    text = render_result(result, "table")
    assert "\x1b[" not in text and "attn.0" in text and "+0.625 ±0.062" in text


def test_models_table() -> None:
    info = ModelInfo(
        id="smollm2-135m",
        architecture="llama",
        n_layers=30,
        n_heads=9,
        n_kv_heads=3,
        d_model=576,
        vocab_size=49152,
        parallel_blocks=False,
        source="builtin",
    )
    line = next(line for line in _text(models_table([info], wide=True)).splitlines() if "smollm2-135m" in line)
    assert all(cell in line for cell in ("llama", "30", "9", "3", "576", "49152", "sequential"))


# --- errors ---------------------------------------------------------------------------------------------------------


def _response(status: int, body: bytes, content_type: str, path: str = "/v1/jobs/abc") -> httpx.Response:
    return httpx.Response(
        status, content=body, headers={"content-type": content_type}, request=httpx.Request("GET", f"http://h{path}")
    )


def test_problem_details_become_hydra_errors() -> None:
    body = {"status": 422, "title": "Unprocessable Content", "detail": "unknown model 'gpt9'", "field": "model"}
    error = problem_from_response(_response(422, json.dumps(body).encode(), "application/problem+json"))
    assert (error.status, error.title, error.detail) == (422, "Unprocessable Content", "unknown model 'gpt9'")
    assert error.problem["field"] == "model"
    assert str(error) == "422 Unprocessable Content: unknown model 'gpt9'"


def test_non_problem_error_bodies_still_read_well() -> None:
    html = b"<html>\n<body>\n  <h1>502 Bad Gateway</h1>\n</body></html>"
    error = problem_from_response(_response(502, html, "text/html"))
    assert error.status == 502 and error.title == "Bad Gateway"
    assert "\n" not in str(error) and "502 Bad Gateway</h1>" in error.detail
    empty = problem_from_response(_response(500, b"", "text/plain"))
    assert str(empty) == "500 Internal Server Error"


def test_finish_raises_on_error_and_on_a_malformed_success() -> None:
    call = _status("abc")
    problem = {"status": 404, "title": "Not Found", "detail": "job abc not found"}
    with pytest.raises(HydraError) as raised:
        _finish(call, _response(404, json.dumps(problem).encode(), "application/problem+json"))
    assert raised.value.status == 404 and "job abc not found" in str(raised.value)
    with pytest.raises(HydraProtocolError, match="did not return a JobStatus"):
        _finish(call, _response(200, b'{"id": "abc"}', "application/json"))
    ok = {"id": "abc", "status": "running", "model": "m", "progress": {"done": 3, "total": 9}, "created_at": "t"}
    status = _finish(call, _response(200, json.dumps(ok).encode(), "application/json"))
    assert status.progress == Progress(done=3, total=9) and status.error is None


def test_job_ids_are_escaped_in_paths() -> None:
    assert _job_path("a/b c", "figures", "te_vs_de") == "/v1/jobs/a%2Fb%20c/figures/te_vs_de"


def test_wait_deadline() -> None:
    def job(state: JobState) -> JobStatus:
        return JobStatus(id="j", status=state, model="m", progress=Progress(done=1, total=4), created_at="t")

    deadline = _Deadline("j", timeout_s=None)
    assert deadline.check(job("succeeded")) and deadline.check(job("cancelled")) and not deadline.check(job("running"))
    with pytest.raises(TimeoutError, match=r"job j is still queued \(1/4\) after 0s"):
        _Deadline("j", timeout_s=0).check(job("queued"))


def test_unreachable_server_is_a_connection_error() -> None:
    url = f"http://127.0.0.1:{_closed_port()}"
    with HydraClient(url) as client:
        assert client.ready() is False
        with pytest.raises(HydraConnectionError) as raised:
            client.status("abc")
    assert raised.value.status == 0 and url in str(raised.value) and "hydra-ablate serve" in str(raised.value)

    async def run() -> None:
        async with AsyncHydraClient(url) as client:
            assert await client.ready() is False
            with pytest.raises(HydraConnectionError):
                await client.models()

    asyncio.run(run())


def test_url_and_key_default_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HYDRA_URL", "http://example.invalid:9/")
    monkeypatch.setenv("HYDRA_API_KEY", "s3cret")
    with HydraClient() as client:
        assert client.base_url == "http://example.invalid:9"
        assert client._http.headers["X-API-Key"] == "s3cret"
    with HydraClient("http://other:1", api_key="") as client:  # explicit arguments win, "" sends no key
        assert client.base_url == "http://other:1" and "X-API-Key" not in client._http.headers
    monkeypatch.delenv("HYDRA_URL")
    monkeypatch.delenv("HYDRA_API_KEY")
    with HydraClient() as client:
        assert client.base_url == "http://127.0.0.1:8000" and "X-API-Key" not in client._http.headers


def test_figure_format_is_checked() -> None:
    with HydraClient("http://127.0.0.1:1") as client, pytest.raises(ValueError, match="png, svg or pdf"):
        client.figure("abc", "te_vs_de", "gif")  # type: ignore[arg-type]


# --- the CLI ------------------------------------------------------------------------------------------------------


def test_cli_choices_match_the_wire_schema() -> None:
    """The CLI's option choices are Enums (portable across typer versions); they must offer exactly the schema's."""
    # Enums at runtime; type checkers see the Literals (cli/main.py), hence Any.
    pairs: list[tuple[Any, Any]] = [
        (main.Ablation, AblationKind),
        (main.Positions, PositionScope),
        (main.Metric, MetricName),
        (main.Preset, PresetName),
    ]
    for choice, literal in pairs:
        assert [str(member) for member in choice] == list(get_args(literal))
    figure_names: Any = main.FigureName
    datasets: Any = main.Dataset
    assert [member.value for member in figure_names] == list(FIGURE_NAMES)
    assert [member.value for member in datasets] == list(get_args(get_type_hints(DatasetRef)["name"]))


# --- the CLI's failure modes ----------------------------------------------------------------------------------------


def test_cli_reports_an_unreachable_server_in_one_line() -> None:
    url = f"http://127.0.0.1:{_closed_port()}"
    outcome = CliRunner().invoke(app, ["status", "abc", "--url", url])
    assert outcome.exit_code == 1
    assert outcome.output.strip().splitlines() == [
        f"error: Cannot reach the API: {url}: [Errno 111] Connection refused (is `hydra-ablate serve` running there?)"
    ]
    assert "Traceback" not in outcome.output


def test_cli_rejects_a_bad_spec_before_sending(tmp_path: Path) -> None:
    spec = tmp_path / "job.yaml"
    spec.write_text("preset: hydra\nseed: -1\n")
    outcome = CliRunner().invoke(app, ["submit", str(spec), "--url", "http://127.0.0.1:1"])
    assert outcome.exit_code == 1
    assert "invalid job request" in outcome.output and "seed" in outcome.output
    assert "Cannot reach" not in outcome.output  # failed locally, never sent


def test_cli_env_supplies_the_url() -> None:
    url = f"http://127.0.0.1:{_closed_port()}"
    outcome = CliRunner().invoke(app, ["models"], env={"HYDRA_URL": url})
    assert outcome.exit_code == 1 and url in outcome.output


# --- terminals: 80 columns, --wide, labelled regressions (issue "Fit into lab tooling", Terminal) ------------------

LONG_COMPONENTS = ["head.29.8", "attn.28"]
JOB_IDS = ["0123456789abcdef0123456789abcdef", "fedcba9876543210fedcba9876543210"]


def _long_named(result: JobResult) -> JobResult:
    """The fixture's result with component names as long as a 30-layer model's."""
    rename = dict(zip(result.components, LONG_COMPONENTS, strict=True))
    summary = msgspec.structs.replace(
        result.summary,
        components=[msgspec.structs.replace(c, component=rename[c.component]) for c in result.summary.components],
    )
    return msgspec.structs.replace(result, components=LONG_COMPONENTS, summary=summary)


def _jobs() -> list[JobStatus]:
    return [
        JobStatus(id=JOB_IDS[0], status="succeeded", model="tiny-gpt_neox_parallel",
                  progress=Progress(done=1800, total=1800), created_at="2025-01-02T03:04:05.123456+00:00",
                  name="a fairly long name for this job", tags=["a", "b"]),
        JobStatus(id=JOB_IDS[1], status="failed", model="smollm2-135m", progress=Progress(done=12, total=1800),
                  created_at="2025-01-02T03:04:05.123456+00:00", error="the worker ran out of memory " * 4),
    ]


def _model() -> ModelInfo:
    return ModelInfo(id="smollm2-135m", architecture="llama", n_layers=30, n_heads=9, n_kv_heads=3, d_model=576,
                     vocab_size=49152, parallel_blocks=False, source="builtin", family="Llama 3",
                     device_name="Intel(R) Xeon(R) Platinum 8480+")


def _render(renderable: object, width: int) -> list[str]:
    console = Console(record=True, width=width, no_color=True)
    console.print(renderable)
    return console.export_text().splitlines()


def _views(result: JobResult, width: int) -> dict[str, object]:
    from cli.views import jobs_table, result_view, status_table

    jobs = _jobs()
    return {
        "result": result_view(_long_named(result), width),
        "jobs": jobs_table(JobPage(items=jobs, total=2, offset=0, limit=50), width),
        "models": models_table([_model()], width),
        "status": status_table(jobs[1], width),
    }


@pytest.mark.parametrize("width", [80, 60, 40])
def test_every_view_fits_the_terminal_and_cuts_no_id_or_component(result: JobResult, width: int) -> None:
    for name, view in _views(result, width).items():
        lines = _render(view, width)
        too_long = [line for line in lines if len(line.rstrip()) > width]
        assert not too_long, (name, too_long)
        words = {word for line in lines for word in line.split()}
        expected = {"result": LONG_COMPONENTS, "jobs": JOB_IDS, "models": ["smollm2-135m"], "status": JOB_IDS[1:]}
        for identifier in expected[name]:
            assert identifier in words, (name, identifier, lines)  # whole, on one line


def test_narrow_tables_say_what_they_leave_out_and_wide_shows_it(result: JobResult) -> None:
    from cli.views import jobs_table, natural_width

    page = JobPage(items=_jobs(), total=2, offset=0, limit=50)
    narrow = "\n".join(_render(jobs_table(page, 80), 80))
    assert "Not shown at this width" in narrow and "--wide" in narrow
    wide = jobs_table(page, 80, wide=True)
    text = "\n".join(_render(wide, natural_width(wide)))
    for header in ("model", "created", "name", "phase", "tags", "owner", "error"):
        assert header in text.splitlines()[2].split(), header
    assert "2025-01-02T03:04:05.123456+00:00" in text and "tiny-gpt_neox_parallel" in text
    models = "\n".join(_render(models_table([_model()], wide=True), 300))
    assert "Intel(R) Xeon(R) Platinum 8480+" in models and "49152" in models


def test_regressions_are_labelled_y_on_x(result: JobResult) -> None:
    from cli.views import regression_label, result_view

    lines = _render(result_view(_long_named(result), 80), 80)
    assert any("head.29.8" in line and "CE on Δunembed" in line for line in lines)
    assert any("attn.28" in line and "compensation on DE" in line for line in lines)
    assert any(line.startswith("mean TE on mean DE across components: slope -1.500") for line in lines)
    wide = "\n".join(_render(result_view(result, None, wide=True), 300))
    for label in ("CE on DE", "CE(attn) on Δunembed", "CE(mlp) on Δunembed", "CE(attn) on DE", "CE(mlp) on DE"):
        assert label in wide, label
    assert regression_label(Regression(y="response[mlp.5]", x="unembed_effect", slope=None, intercept=None, r2=None,
                                       n=0)) == "response of mlp.5 on Δunembed"


def test_cli_output_width_follows_columns(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "80")
    assert main.output_width() == 80
    monkeypatch.delenv("COLUMNS")
    assert main.output_width() is None  # a pipe (pytest's stdout): as wide as the tables need


# --- submit exposes every job option; wait; Ctrl-C ----------------------------------------------------------------

# JobRequest field -> the submit flag that sets it.
SUBMIT_FLAGS = {
    "preset": "--preset", "model": "--model", "prompts": "--prompt", "dataset": "--dataset", "answers": "--answer",
    "counterfactuals": "--counterfactual", "components": "--components", "knockouts": "--knockout",
    "ablation": "--ablation", "estimates": "--estimates", "verify": "--verify",
    "positions": "--positions", "metric": "--metric", "norm_scale": "--norm-scale", "resample_samples": "--samples",
    "resample_from": "--resample-from", "mean_reference": "--mean-reference", "seed": "--seed",
    "source_seeds": "--source-seeds", "name": "--name",
    "tags": "--tag", "metadata": "--meta", "callback_url": "--callback-url", "keep_samples": "--keep-samples",
    "only_correct": "--only-correct", "resample_within": "--resample-within", "resample_sources": "--resample-sources",
    "texts": "--text", "corpus": "--corpus",
    "max_tokens": "--max-tokens", "measure_positions": "--measure-positions", "target": "--target",
    "response_basis": "--response-basis", "position_responses": "--position-responses",
    "intervention": "--intervention", "pairs": "--pairs", "pair_dataset": "--pair-dataset",
    "direction": "--direction", "epsilon": "--epsilon",
}


def test_submit_has_a_flag_with_help_for_every_job_request_field() -> None:
    import typer.main

    command = typer.main.get_command(app).commands["submit"]  # type: ignore[attr-defined]
    options = {opt: param for param in command.params for opt in getattr(param, "opts", [])}
    assert set(SUBMIT_FLAGS) == set(JobRequest.__struct_fields__), "a JobRequest field without a submit flag"
    for field, flag in SUBMIT_FLAGS.items():
        assert flag in options, (field, flag)
        assert options[flag].help, flag


class _FakeClient:
    """Stands in for HydraClient in the CLI: records submits, plays a scripted sequence of statuses."""

    submitted: ClassVar[list[JobRequest]] = []
    script: ClassVar[list[JobStatus]] = []
    interrupt: ClassVar[bool] = False

    def __init__(self, base_url: str | None = None, api_key: str | None = None) -> None:
        self.base_url = (base_url or "http://127.0.0.1:8000").rstrip("/")

    def __enter__(self) -> _FakeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def submit(self, request: JobRequest, idempotency_key: str | None = None) -> JobStatus:
        self.submitted.append(request)
        return _job_status(JOB_IDS[0], "queued")

    def wait(self, job_id: str, poll_s: float = 0.5, on_progress: object = None) -> JobStatus:
        for status in self.script:
            on_progress(status)  # type: ignore[operator]
        if self.interrupt:
            raise KeyboardInterrupt
        return self.script[-1]


def _job_status(job_id: str, state: str, error: str | None = None) -> JobStatus:
    return JobStatus(id=job_id, status=state, model="tiny", progress=Progress(done=3, total=9),  # type: ignore[arg-type]
                     created_at="2025-01-02T03:04:05+00:00", error=error)


@pytest.fixture
def fake_client(monkeypatch: pytest.MonkeyPatch) -> type[_FakeClient]:
    monkeypatch.setattr(main, "HydraClient", _FakeClient)
    _FakeClient.submitted = []
    _FakeClient.script = []
    _FakeClient.interrupt = False
    return _FakeClient


def test_submit_sends_every_option_it_is_given(fake_client: type[_FakeClient]) -> None:
    outcome = CliRunner().invoke(app, [
        "submit", "--model", "tiny", "--text", "One document.", "--text", "Another one.", "--components", "head",
        "--ablation", "mean", "--norm-scale", "ablated", "--resample-from", "random", "--resample-within", "job",
        "--mean-reference", "known_1000", "--seed", "3", "--keep-samples", "--only-correct", "--max-tokens", "32",
        "--measure-positions", "all", "--positions", "all", "--target", "next_token", "--response-basis", "heads",
        "--position-responses", "full", "--name", "docs", "--tag", "a", "--tag", "b:1", "--meta", "run=3",
        "--meta", "note=first try", "--callback-url", "https://example.org/hook", "--metric", "logit",
    ])
    assert outcome.exit_code == 0, outcome.output
    sent = fake_client.submitted[0]
    assert sent.texts == ["One document.", "Another one."] and sent.components == ["head"]
    assert (sent.ablation, sent.norm_scale, sent.resample_from, sent.resample_within) == ("mean", "ablated", "random",
                                                                                          "job")
    assert sent.mean_reference == DatasetRef(name="known_1000")
    assert (sent.seed, sent.keep_samples, sent.only_correct, sent.max_tokens) == (3, True, True, 32)
    assert (sent.measure_positions, sent.target, sent.response_basis, sent.position_responses) == (
        "all", "next_token", "heads", "full")
    assert (sent.name, sent.tags, sent.metadata) == ("docs", ["a", "b:1"], {"run": 3, "note": "first try"})
    assert sent.callback_url == "https://example.org/hook"


def test_submit_sends_each_knockout_flag_as_one_set(fake_client: type[_FakeClient]) -> None:
    outcome = CliRunner().invoke(app, [
        "submit", "--model", "tiny", "--prompt", "a", "--prompt", "b", "--knockout", "attn.3, head.5.1",
        "--knockout", "mlp.7,mlp.8",
    ])
    assert outcome.exit_code == 0, outcome.output
    sent = fake_client.submitted[0]
    assert sent.knockouts == [["attn.3", "head.5.1"], ["mlp.7", "mlp.8"]]
    assert sent.components is msgspec.UNSET  # the server then ablates only the sets


def test_submit_sends_the_estimates_flag_as_a_list(fake_client: type[_FakeClient]) -> None:
    outcome = CliRunner().invoke(app, [
        "submit", "--model", "tiny", "--prompt", "a", "--prompt", "b", "--estimates", "atp, atp_star",
    ])
    assert outcome.exit_code == 0, outcome.output
    assert fake_client.submitted[0].estimates == ["atp", "atp_star"]


def test_submit_sends_a_patching_job(fake_client: type[_FakeClient], tmp_path: Path) -> None:
    pair = {"clean": "Anna gave Ben a book", "corrupted": "Clara gave David a book", "answer": " Ben",
            "counterfactual": " Anna"}
    (tmp_path / "pairs.json").write_text(json.dumps([pair]), encoding="utf-8")
    runner = CliRunner()
    outcome = runner.invoke(app, [
        "submit", "--model", "tiny", "--pairs", str(tmp_path / "pairs.json"), "--intervention", "patch",
        "--direction", "noise", "--components", "resid_pre,head.1.0.q", "--positions", "all", "--epsilon", "0.01",
    ])
    assert outcome.exit_code == 0, outcome.output
    sent = fake_client.submitted[0]
    assert (sent.intervention, sent.direction, sent.positions, sent.epsilon) == ("patch", "noise", "all", 0.01)
    assert sent.components == ["resid_pre", "head.1.0.q"]
    assert sent.pairs == [PromptPair(**pair)]
    outcome = runner.invoke(app, ["submit", "--model", "tiny", "--pair-dataset", "ioi", "--limit", "5"])
    assert outcome.exit_code == 0, outcome.output
    sent = fake_client.submitted[1]
    assert sent.intervention == "patch" and sent.pair_dataset == PairDatasetRef(name="ioi", limit=5)
    assert sent.dataset is msgspec.UNSET  # --limit sized the pair dataset
    (tmp_path / "bad.json").write_text('{"clean": "a"}', encoding="utf-8")
    outcome = runner.invoke(app, ["submit", "--pairs", str(tmp_path / "bad.json")])
    assert outcome.exit_code == 1 and "must hold a list of pairs" in outcome.output


def test_submit_corpus_and_dataset_slices(fake_client: type[_FakeClient]) -> None:
    runner = CliRunner()
    assert runner.invoke(app, ["submit", "--corpus", "known_1000_text", "--limit", "4", "--offset", "2"]).exit_code == 0
    assert runner.invoke(app, ["submit", "--preset", "rushing_nanda", "--limit", "5"]).exit_code == 0
    assert runner.invoke(app, ["submit", "--relation", "P36", "--use-answers", "--answer", "x"]).exit_code == 0
    corpus, preset, dataset = fake_client.submitted
    assert corpus.corpus is not msgspec.UNSET and (corpus.corpus.limit, corpus.corpus.offset) == (4, 2)
    assert preset.corpus is not msgspec.UNSET and preset.corpus.limit == 5  # the preset reads a corpus
    assert dataset.dataset == DatasetRef(name="known_1000", relation="P36", use_answers=True)
    assert dataset.answers == ["x"]
    clash = runner.invoke(app, ["submit", "--text", "a b", "--corpus", "known_1000_text"])
    assert clash.exit_code == 1 and "alternatives" in clash.output
    bad_meta = runner.invoke(app, ["submit", "--meta", "novalue"])
    assert bad_meta.exit_code == 1 and "KEY=VALUE" in bad_meta.output


@pytest.mark.parametrize(("state", "code"), [("succeeded", 0), ("failed", 1), ("cancelled", 2)])
def test_wait_ends_with_the_final_status_and_its_exit_code(fake_client: type[_FakeClient], state: str,
                                                          code: int) -> None:
    fake_client.script = [_job_status(JOB_IDS[1], "running"),
                          _job_status(JOB_IDS[1], state, "boom" if state == "failed" else None)]
    outcome = CliRunner().invoke(app, ["wait", JOB_IDS[1]])
    assert outcome.exit_code == code, outcome.output
    assert JOB_IDS[1] in outcome.output and state in outcome.output
    if state == "failed":
        assert "boom" in outcome.output


@pytest.mark.parametrize("command", [["wait", JOB_IDS[0]], ["submit", "-p", "a b", "-p", "c d", "--wait"]])
def test_ctrl_c_while_following_says_the_job_goes_on_and_how_to_cancel(fake_client: type[_FakeClient],
                                                                      command: list[str]) -> None:
    fake_client.script = [_job_status(JOB_IDS[0], "running")]
    fake_client.interrupt = True
    outcome = CliRunner().invoke(app, [*command, "--url", "http://lab-box:9000"])
    assert outcome.exit_code == 130, outcome.output
    assert f"job {JOB_IDS[0]} goes on on the server" in outcome.output
    assert f"hydra-ablate cancel {JOB_IDS[0]} --url http://lab-box:9000" in outcome.output.splitlines()[-1]
    default = CliRunner().invoke(app, command)
    assert default.output.splitlines()[-1].strip() == f"hydra-ablate cancel {JOB_IDS[0]}"  # the default URL: no --url


def test_verify_flag_is_top_and_an_optional_random() -> None:
    from cli.main import parse_verify

    assert parse_verify("20,10") == {"top": 20, "random": 10}
    assert parse_verify("5") == {"top": 5, "random": 0}
    for bad in ("", "a,b", "1,2,3"):
        with pytest.raises(CliFailure, match="TOP or TOP,RANDOM"):
            parse_verify(bad)
