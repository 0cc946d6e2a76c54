"""Leaks closed: credentials in log lines, auth-off stacks on every interface, API keys written to the wrong Redis
or under a name the environment already uses. Real Redis servers (private, free ports), the real CLI."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import redis
from typer.testing import CliRunner

from cli.main import app as cli_app
from cli.stack import Stack, check_exposure
from service.core.api_keys import keys_hash
from service.core.embedded_redis import EmbeddedRedis, free_port
from service.core.redaction import install_log_redaction, redact

SECRET = "s3cret-Pa55"


def test_redact_hides_url_passwords_and_keeps_the_rest() -> None:
    assert redact(f"at redis://:{SECRET}@10.0.0.1:6379/0 now") == "at redis://:***@10.0.0.1:6379/0 now"
    assert redact(f"rediss://default:{SECRET}@cache.example:6380") == "rediss://default:***@cache.example:6380"
    assert redact("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"


def test_every_log_line_of_the_process_is_redacted(caplog: pytest.LogCaptureFixture) -> None:
    install_log_redaction()
    with caplog.at_level(logging.INFO):
        logging.getLogger("celery.some.library").info("broker %s", f"redis://user:{SECRET}@h:1/0")
        logging.getLogger("hydra-ablate").warning(f"using Redis at redis://:{SECRET}@h:1/0")
    assert caplog.records and SECRET not in caplog.text
    assert "redis://user:***@h:1/0" in caplog.text


def test_the_stack_logs_its_redis_url_without_the_password(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    """`hydra-ablate serve` with a password in REDIS_URL: the start-up line names the Redis, not the password."""
    monkeypatch.setenv("REDIS_URL", f"redis://:{SECRET}@127.0.0.1:{free_port()}/0")
    stack = Stack(port=free_port(), workers=0, data_dir=tmp_path)
    monkeypatch.setattr(stack, "_spawn", lambda name, command, env: None)  # the log line, not the processes
    with caplog.at_level(logging.INFO, logger="hydra-ablate"):
        stack.start()
    assert "using Redis at redis://:***@127.0.0.1" in caplog.text and SECRET not in caplog.text


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.20", "::"])
def test_serving_beyond_loopback_with_auth_off_is_refused(host: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("REDIS_URL", raising=False)
    monkeypatch.delenv("HYDRA_AUTH", raising=False)
    monkeypatch.delenv("HYDRA_ALLOW_REMOTE_NO_AUTH", raising=False)
    result = CliRunner().invoke(cli_app, ["serve", "--host", host, "--port", str(free_port())])
    assert result.exit_code == 1, result.output
    assert "refusing to listen on" in result.output and "--allow-remote-without-auth" in result.output


def test_exposure_rules() -> None:
    check_exposure("127.0.0.1", {})  # embedded, auth off, loopback: the local default
    check_exposure("0.0.0.0", {"REDIS_URL": "redis://r:6379/0"})  # auth on by default with a REDIS_URL
    check_exposure("0.0.0.0", {}, allow=True)
    check_exposure("0.0.0.0", {"HYDRA_ALLOW_REMOTE_NO_AUTH": "1"})
    check_exposure("0.0.0.0", {"HYDRA_AUTH": "on"})
    with pytest.raises(ValueError, match="refusing"):
        check_exposure("0.0.0.0", {"REDIS_URL": "redis://r:6379/0", "HYDRA_AUTH": "off"})


@pytest.fixture
def no_redis_url(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """REDIS_URL unset and the data folder of `hydra-ablate serve` in a temporary place."""
    monkeypatch.delenv("REDIS_URL", raising=False)
    monkeypatch.delenv("HYDRA_API_KEYS", raising=False)
    monkeypatch.setenv("HYDRA_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("HYDRA_KEY_PREFIX", "test-leaks:")
    return tmp_path


def test_keys_create_without_redis_url_and_no_running_stack_is_refused(no_redis_url: Path) -> None:
    result = CliRunner().invoke(cli_app, ["keys", "create", "erin"])
    assert result.exit_code == 1, result.output
    assert "REDIS_URL is not set" in result.output and "hydra-ablate serve" in result.output


def test_keys_create_without_redis_url_uses_the_running_embedded_redis(no_redis_url: Path) -> None:
    server = EmbeddedRedis(data_dir=no_redis_url / "redis")  # where `hydra-ablate serve` puts it
    server.start()
    try:
        result = CliRunner().invoke(cli_app, ["keys", "create", "erin"])
        assert result.exit_code == 0, result.output
        client = redis.Redis.from_url(server.url)
        assert client.hlen(keys_hash("test-leaks:")) == 1
        client.close()
    finally:
        server.stop()
    # Stopped: its endpoint file is gone, so the next command refuses instead of guessing.
    assert CliRunner().invoke(cli_app, ["keys", "list"]).exit_code == 1


def test_a_stale_endpoint_file_pointing_at_another_redis_is_not_trusted(no_redis_url: Path) -> None:
    other = EmbeddedRedis(data_dir=no_redis_url / "elsewhere")
    other.start()
    try:
        (no_redis_url / "redis").mkdir()
        (no_redis_url / "redis" / "endpoint").write_text(other.url)
        result = CliRunner().invoke(cli_app, ["keys", "create", "erin"])
        assert result.exit_code == 1 and "REDIS_URL is not set" in result.output
        client = redis.Redis.from_url(other.url)
        assert client.hlen(keys_hash("test-leaks:")) == 0
        client.close()
    finally:
        other.stop()


def test_env_key_names_cannot_be_created_and_revoking_one_says_how(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REDIS_URL", redis_url)
    monkeypatch.setenv("HYDRA_KEY_PREFIX", "test-leaks-env:")
    monkeypatch.setenv("HYDRA_API_KEYS", "frank:frank-key,grace:grace-key:admin")
    runner = CliRunner()
    created = runner.invoke(cli_app, ["keys", "create", "grace"])
    assert created.exit_code == 1 and "defined in HYDRA_API_KEYS" in created.output
    revoked = runner.invoke(cli_app, ["keys", "revoke", "frank"])
    assert revoked.exit_code == 1
    assert "HYDRA_API_KEYS" in revoked.output and "restart the API" in revoked.output


def test_the_keys_cli_never_prints_a_redis_password(monkeypatch: Any) -> None:
    monkeypatch.setenv("REDIS_URL", f"redis://:{SECRET}@127.0.0.1:{free_port()}/0")
    result = CliRunner().invoke(cli_app, ["keys", "list"])
    assert result.exit_code == 1 and "cannot use Redis" in result.output and SECRET not in result.output
