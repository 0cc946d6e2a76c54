"""The settings registry (service/core/configuration.py): every variable read is listed, the docs page is generated
from it, and no job or chunk reads the environment."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from hydra_ablate_client import http
from service.core import configuration
from service.core.settings import Settings, env_int, env_text
from tests.test_layering import scanned_files
from worker.worker_settings import WorkerSettings

ROOT = Path(__file__).resolve().parent.parent
READERS = {"env_raw", "env_text", "env_int", "env_float", "env_bool", "_bytes_or_zero"}
# Where jobs and chunks run: their settings come from the typed objects read at start-up, never from os.environ.
HOT_PATHS = [
    "service/core/queue.py",
    "service/core/chunk_book.py",
    "worker/tasks.py",
    "worker/chunk_execution.py",
    "worker/job_runner.py",
]


def python_files() -> list[Path]:
    return scanned_files()  # service/, worker/, cli/, clients/python/ as the checkout has them


def _name(node: ast.expr) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_name(node.value)}.{node.attr}"
    return ""


def reads(path: Path) -> list[tuple[int, str, str]]:
    """(line, function, first argument's text) of every environment read in one file."""
    found = []
    module_constants = {}
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    module_constants[target.id] = node.value.value
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call) or not node.args:
            continue
        function = _name(node.func)
        if function.split(".")[-1] in READERS or function in ("os.environ.get", "os.getenv", "environ.get"):
            argument = node.args[0]
            if isinstance(argument, ast.Constant) and isinstance(argument.value, str):
                text = argument.value
            elif isinstance(argument, ast.Name) and argument.id in module_constants:
                text = module_constants[argument.id]
            else:
                text = ast.unparse(argument)
            found.append((node.lineno, function, text))
    return found


def test_the_configuration_page_is_generated_from_the_registry() -> None:
    committed = configuration.PAGE.read_text()
    assert committed == configuration.render_page(), "run `python -m service.core.configuration` and commit the page"
    assert configuration.main(["--check"]) == 0
    for entry in configuration.VARIABLES:
        assert f"| `{entry.name}` |" in committed


def test_every_variable_read_is_in_the_registry_and_every_entry_is_read() -> None:
    unlisted, read = [], set()
    for path in python_files():
        for line, function, name in reads(path):
            if name == "name":  # inside a reader: its parameter
                continue
            if name in configuration.BY_NAME:
                read.add(name)
            else:
                unlisted.append(f"{path.relative_to(ROOT)}:{line}: {function}({name}) is not in the registry")
    assert not unlisted, "\n".join(unlisted)
    never_read = sorted(set(configuration.BY_NAME) - read)
    assert not never_read, f"listed in the registry but read nowhere: {never_read}"


def test_only_the_settings_module_and_the_client_read_os_environ() -> None:
    allowed = {"service/core/settings.py", "clients/python/hydra_ablate_client/http.py"}
    offenders = [
        f"{path.relative_to(ROOT)}:{line}: {function}({name})"
        for path in python_files()
        for line, function, name in reads(path)
        if function in ("os.environ.get", "os.getenv", "environ.get")
        and str(path.relative_to(ROOT)) not in allowed
    ]
    assert not offenders, "read through service/core/settings.py (registered names):\n" + "\n".join(offenders)


def test_jobs_and_chunks_never_read_the_environment() -> None:
    offenders = [
        f"{relative}:{line}: {function}({name})"
        for relative in HOT_PATHS
        for line, function, name in reads(ROOT / relative)
    ]
    assert not offenders, "settings of jobs and chunks are read once, into Settings/WorkerSettings:\n" + "\n".join(
        offenders
    )


def test_the_clients_variables_are_the_registrys() -> None:
    client_side = {entry.name for entry in configuration.VARIABLES if "client" in entry.read_by}
    assert client_side == set(http.ENVIRONMENT) == {"HYDRA_URL", "HYDRA_API_KEY"}


def test_an_unregistered_variable_cannot_be_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HYDRA_NOT_A_SETTING", "3")
    with pytest.raises(LookupError, match="HYDRA_NOT_A_SETTING is not in the settings registry"):
        env_int("HYDRA_NOT_A_SETTING", 1)
    with pytest.raises(LookupError):
        env_text("HYDRA_NOT_A_SETTING")


def test_chunk_and_batch_settings_are_read_once_into_typed_objects(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HYDRA_CHUNK_PROMPTS", "7")
    monkeypatch.setenv("HYDRA_MAX_DELIVERIES", "5")
    monkeypatch.setenv("HYDRA_BATCH_TOKENS", "4096")
    settings, worker = Settings.from_env(), WorkerSettings.from_env()
    assert (settings.chunk_prompts, settings.max_deliveries, worker.batch_tokens) == (7, 5, 4096)
    monkeypatch.setenv("HYDRA_CHUNK_PROMPTS", "9")
    assert settings.chunk_prompts == 7  # frozen: a later change of the environment is not seen
    monkeypatch.delenv("HYDRA_BATCH_TOKENS")
    assert WorkerSettings.from_env().batch_tokens is None
    monkeypatch.setenv("HYDRA_CHUNK_PROMPTS", "seven")
    with pytest.raises(ValueError, match="HYDRA_CHUNK_PROMPTS must be an integer, got 'seven'"):
        Settings.from_env()
