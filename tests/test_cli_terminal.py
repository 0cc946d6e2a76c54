"""The CLI in a lab's terminal, against the real stack (uvicorn, the session's Celery worker, Redis): 80 columns,
`wait` re-attaching to a job, Ctrl-C leaving the job running; and quiet model loading and access logs for the
terminal of `hydra-ablate serve` / `demo`."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.main import app as cli_app
from hydra_ablate_client.http import HydraClient, HydraProtocolError
from service.api.app import create_app
from tests.live_server import serve

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["The capital of France is", "Water boils at a temperature of"]
SLOW_PROMPTS = [f"Item {i} of the list is" for i in range(300)]
SLOW_JOB: dict[str, object] = {"model": "tiny-llama", "prompts": SLOW_PROMPTS, "components": ["head"],
                               "resample_samples": 16}


@pytest.fixture(scope="module")
def live_url(celery_worker: object, stack_env: dict[str, str]) -> Iterator[str]:
    """The real app served over HTTP by uvicorn in a thread (as tests/test_client_stack.py)."""
    from service.core.settings import Settings

    with serve(create_app(Settings.from_env())) as url:
        yield url


def _lines_fit(output: str, width: int) -> None:
    too_long = [line for line in output.splitlines() if len(line) > width]
    assert not too_long, too_long


def test_cli_output_fits_80_columns_with_ids_and_components_whole(live_url: str) -> None:
    runner = CliRunner()
    env = {"COLUMNS": "80"}
    base = ["--url", live_url]
    submitted = runner.invoke(
        cli_app,
        ["submit", "--model", "tiny-gpt_neox_parallel", "-p", PROMPTS[0], "-p", PROMPTS[1], "--components",
         "attn,mlp", "--name", "eighty columns", "--tag", "terminal", "--wait", *base],
        env=env,
    )
    assert submitted.exit_code == 0, submitted.output
    job_id = next(line.strip() for line in submitted.output.splitlines() if len(line.strip()) == 32)
    with HydraClient(live_url) as client:
        components = client.result(job_id).components
    outputs = {"submit --wait": submitted.output}
    for name, args in {
        "result": ["result", job_id],
        "status": ["status", job_id],
        "list": ["list", "--limit", "500"],
        "models": ["models"],
        "wait": ["wait", job_id],
    }.items():
        outcome = runner.invoke(cli_app, [*args, *base], env=env)
        assert outcome.exit_code == 0, (name, outcome.output)
        outputs[name] = outcome.output
    for name, output in outputs.items():
        _lines_fit(output, 80)
        words = {word for line in output.splitlines() for word in line.split()}
        if name in ("status", "list", "wait"):
            assert job_id in words, (name, output)
        if name in ("submit --wait", "result"):
            assert set(components) <= words, (name, output)
            assert "CE on Δunembed" in output and "compensation on DE" in output
        if name == "models":
            assert {"tiny-gpt_neox_parallel", "smollm2-135m"} <= words
    wide = runner.invoke(cli_app, ["list", "--wide", "--limit", "500", *base], env=env)
    assert wide.exit_code == 0 and "eighty columns" in wide.output and "terminal" in wide.output


def test_wait_reattaches_and_exits_non_zero_for_a_cancelled_job(live_url: str) -> None:
    with HydraClient(live_url) as client:
        slow = client.submit(SLOW_JOB)
        client.cancel(slow.id)
    outcome = CliRunner().invoke(cli_app, ["wait", slow.id, "--poll", "0.1", "--url", live_url])
    assert outcome.exit_code == 2, outcome.output
    assert "cancelled" in outcome.output and slow.id in outcome.output


def test_ctrl_c_leaves_the_job_running_and_prints_the_cancel_command(live_url: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "80"}
    command = [sys.executable, "-m", "cli.main", "submit", "--model", "tiny-llama", "--components", "head",
               "--samples", "16", *(arg for p in SLOW_PROMPTS for arg in ("-p", p)), "--wait",
               "--url", live_url]
    # A shell starts background commands with SIGINT ignored, and Python then installs no KeyboardInterrupt handler:
    # give the CLI the default disposition a terminal would, whatever started this test.
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    job_id = ""
    try:
        assert process.stdout is not None
        job_id = process.stdout.readline().strip()  # printed once submitted: the CLI follows the job from here
        assert len(job_id) == 32, job_id
        time.sleep(1.5)
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=60)
        assert process.returncode == 130, (stdout, stderr)
        assert f"job {job_id} goes on on the server" in stderr
        assert f"hydra-ablate cancel {job_id} --url {live_url}" in stderr.splitlines()[-1]
        assert "Traceback" not in stderr
        with HydraClient(live_url) as client:
            assert client.status(job_id).status in ("queued", "running")  # Ctrl-C stopped the CLI, not the job
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        if job_id:
            with HydraClient(live_url) as client:
                # The job may end between the check above and this DELETE; a DELETE of an ended job deletes it
                # (204, no status to decode), which the client's cancel does not expect (it wants a running job).
                if client.status(job_id).status in ("queued", "running"):
                    try:
                        client.cancel(job_id)
                    except HydraProtocolError as error:
                        assert error.status == 204, error
                    else:
                        assert client.wait(job_id, poll_s=0.1, timeout_s=120).status == "cancelled"


# --- a quiet terminal for serve and demo ---------------------------------------------------------------------------


def _quiet_state() -> tuple[bool, int, object]:
    from transformers import modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    return hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity(), gguf_utils.tqdm


def test_model_loading_prints_no_progress_bars_or_warnings(
    tiny_model_dirs: dict[str, str], capfd: pytest.CaptureFixture[str]
) -> None:
    import warnings

    from worker.model_cache import load_model, quiet_loading
    from worker.model_sources import parse_source

    before = _quiet_state()
    capfd.readouterr()
    loaded = load_model(parse_source(f"tiny={tiny_model_dirs['tiny-llama']}"))
    captured = capfd.readouterr()
    assert loaded.model is not None
    assert "Loading weights" not in captured.err + captured.out
    assert "it/s]" not in captured.err + captured.out
    assert _quiet_state() == before  # the settings are back as they were
    with pytest.warns(UserWarning, match="real"), quiet_loading():
        warnings.warn("a real problem elsewhere", UserWarning, stacklevel=1)  # other modules' warnings still show
    with pytest.raises((OSError, ValueError)), quiet_loading():
        load_model(parse_source(f"missing={tiny_model_dirs['tiny-llama']}-missing"))  # errors propagate


@pytest.mark.slow
def test_the_builtin_gguf_loads_without_dequantisation_bars(capfd: pytest.CaptureFixture[str]) -> None:
    from worker.model_cache import load_model
    from worker.model_sources import builtin_smollm2

    capfd.readouterr()
    load_model(builtin_smollm2())
    captured = capfd.readouterr()
    assert "de-quantizing" not in captured.err + captured.out
    assert "Loading weights" not in captured.err + captured.out


def test_access_log_can_be_turned_off(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    import asyncio

    from service.api.observability import observability_middleware
    from service.core.settings import Settings

    async def inner(scope: object, receive: object, send: object) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})  # type: ignore[operator]

    async def send(message: object) -> None:
        return None

    def request(setting: str | None) -> list[logging.LogRecord]:
        if setting is None:
            monkeypatch.delenv("HYDRA_ACCESS_LOG", raising=False)
        else:
            monkeypatch.setenv("HYDRA_ACCESS_LOG", setting)
        middleware = observability_middleware(inner, Settings.from_env().access_log)  # type: ignore[arg-type]
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="hydra.access"):
            asyncio.run(middleware({"type": "http", "method": "GET", "path": "/ready", "headers": []},  # type: ignore[arg-type]
                                   None, send))  # type: ignore[arg-type]
        return [r for r in caplog.records if r.name == "hydra.access"]

    assert len(request(None)) == 1
    assert request("off") == []


def test_the_local_stack_turns_the_access_log_off_unless_asked(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from cli.stack import Stack

    spawned: list[dict[str, str]] = []
    monkeypatch.setattr(Stack, "_spawn", lambda self, name, command, env, nice=0: spawned.append(env))
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:1/0")
    monkeypatch.delenv("HYDRA_ACCESS_LOG", raising=False)
    Stack(data_dir=tmp_path).start()
    assert {env["HYDRA_ACCESS_LOG"] for env in spawned} == {"off"}
    spawned.clear()
    monkeypatch.setenv("HYDRA_ACCESS_LOG", "on")
    Stack(data_dir=tmp_path).start()
    assert {env["HYDRA_ACCESS_LOG"] for env in spawned} == {"on"}


def test_the_demo_shows_numbers_even_when_the_model_answers_none_of_its_prompts(
    live_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The hydra preset keeps only correctly answered prompts; a random tiny model answers none of the demo's few
    known_1000 prompts, and the demo must still finish with its table and figure (it measures every prompt)."""
    from cli.main import run_demo

    figure = tmp_path / "demo.png"
    with HydraClient(live_url) as client:
        run_demo(client, 3, 2, figure, model="tiny-llama")
    assert figure.read_bytes().startswith(b"\x89PNG")
    assert "attn.0" in capsys.readouterr().out
