"""The README and the documentation site tell the truth: links that resolve, the routes the app serves, commands and
flags the CLI has, settings the code reads, no development history, and a starting script that runs.

`mkdocs build --strict` (scripts/test.sh) checks the links between pages; these tests check what it cannot see.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, get_args

import pytest
import typer

from cli.main import app as cli_app

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
README_MAX_LINES = 200


def pages() -> list[Path]:
    return [README, *sorted(DOCS.rglob("*.md"))]


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def code_blocks(text: str) -> list[str]:
    return re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S)


# --- the README is a front door ---------------------------------------------------------------------------------


def test_readme_is_short() -> None:
    lines = README.read_text().count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; keep at most {README_MAX_LINES} (detail: docs/)"


def test_ci_runs_the_readme_test_command() -> None:
    readme = README.read_text()
    assert "bash scripts/test.sh" in readme and "bash scripts/demo.sh" in readme
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^bash scripts/test\.sh\b", ci, flags=re.M), ".ci/run must call the README's test command"


def test_readme_links_resolve() -> None:
    """Relative links in the README point at files (and anchors of pages) that exist in the repository."""
    text = README.read_text()
    targets = re.findall(r"\]\(([^)\s]+)\)", text)
    assert targets, "the README links to the docs"
    for target in targets:
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        file = ROOT / path
        assert file.exists(), f"README links to {target}, which does not exist"
        if anchor and file.suffix == ".md":
            assert anchor in heading_anchors(file.read_text()), f"README links to {target}: no such heading"


def heading_anchors(text: str) -> set[str]:
    """The ids Python-Markdown's toc extension gives headings (lower case, punctuation dropped, spaces → -)."""
    anchors = set()
    for heading in re.findall(r"^#+ (.+)$", text, flags=re.M):
        slug = re.sub(r"[^\w\s-]", "", heading.lower()).strip()
        anchors.add(re.sub(r"[-\s]+", "-", slug))
    return anchors


def app_routes() -> set[tuple[str, str]]:
    """(method, path) of every route the API serves, path parameters written `{name}`, the web page's as `/ui`."""
    from service.api.app import create_app
    from service.core.settings import Settings

    app = create_app(Settings(redis_url="redis://127.0.0.1:1/0"))  # routes only: nothing connects before start-up
    routes = set()
    for route in app.routes:
        path = re.sub(r"\{(\w+)(:\w+)?\}", r"{\1}", route.path).replace("{job_id}", "{id}")
        if path.startswith("/ui"):
            routes.add(("GET", "/ui"))
            continue
        if path.startswith("/schema/"):
            continue  # the OpenAPI document's renderings, summarised as /schema
        for method in getattr(route, "methods", set()) - {"HEAD", "OPTIONS"}:
            routes.add((method, path))
    return routes


def test_readme_route_summary_lists_every_route() -> None:
    """Every route of the app is in the README's summary (a drifted table fails here), and nothing else is."""
    text = README.read_text()
    listed = set()
    for methods, path in re.findall(r"^\| `((?:[A-Z]+, )*[A-Z]+) (/[^`]*)`", text, flags=re.M):
        for method in methods.split(", "):
            listed.add((method, path))
    served = app_routes()
    assert served - listed == set(), f"routes the app serves that the README's summary lacks: {served - listed}"
    assert listed - served == set(), f"routes in the README's summary that the app does not serve: {listed - served}"


def test_http_guide_lists_every_route() -> None:
    text = (DOCS / "guides" / "http-api.md").read_text()
    for method, path in app_routes():
        shown = "/ui" if path == "/ui" else f"{method} {path}"
        assert f"`{shown}`" in text, f"docs/guides/http-api.md does not list {shown}"


def test_result_formats_are_documented() -> None:
    from hydra_ablate_client.vocabulary import FIGURE_NAMES, ExportFormat

    readme, results = README.read_text(), (DOCS / "guides" / "results.md").read_text()
    for fmt in get_args(ExportFormat):
        assert fmt in readme and f"`{fmt}`" in results, f"result format {fmt} is not documented"
    for name in FIGURE_NAMES:
        assert f"`{name}`" in results, f"figure {name} is not on docs/guides/results.md"


def test_site_builds_strictly_with_repository_files_published(tmp_path: Path) -> None:
    """The site builds in strict mode (as scripts/test.sh runs it), the OpenAPI document and the raw benchmark numbers
    are published where the pages link to them, and the starting script is shown in full on its page."""
    import os

    site = tmp_path / "site"
    build = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert build.returncode == 0, build.stdout + build.stderr
    assert (site / "reference" / "openapi.json").read_bytes() == (ROOT / "openapi" / "openapi.json").read_bytes()
    for raw in (ROOT / "bench").glob("*.json"):
        assert (site / "results" / "bench" / raw.name).exists(), raw.name
    page = (site / "guides" / "first-sweep" / "index.html").read_text()
    assert "run_sweep" in page and "to_pandas" in page, "the script is not included in its page"
    assert (site / "examples" / "first_sweep.png").exists()


# --- no development history in user-facing pages -----------------------------------------------------------------

# Phrases that speak of how the project was built rather than of what it does. "Target" alone is a word of the
# science (the target token) and "rounding" one of arithmetic: only their development-history uses are matched.
HISTORY = [
    r"\bissues? #?\d+",
    r"\bthe issue\b",
    r"\bpoints? \d+\s*[–-]\s*\d+\b",
    r"\brounds?\b(?![ -]trip)",
    r"\btargets? (?:was|were|is met|are met|met|are unmeasured)\b",
    r"\btargets? (?:of )?[≥≤<>]",
    r"\(targets? [\d≥≤<>]",
    r"\bagainst the target\b",
    r"\b(?:poll|submit|speed|latency|acceptance) target\b",
    r"\bacceptance\b",
    r"\bsessions? that (?:wrote|ran|made)\b",
    r"\bthis session\b",
    r"\bhelpers? (?:was|were)\b",
    r"\bno longer\b",
    r"\bat the start of this\b",
]


def test_history_phrasing_detector_catches_history() -> None:
    history = [
        "## Hardening (issue 9, points 5–10)",
        "the code at the start of this round gave",
        "The target was ≥ 3× both peers",
        "p99 23–40 ms (target 100)",
        "No GPU was lent to the session that wrote this",
        "the fallback the issue names",
    ]
    science = [
        "with the true next token as target",
        "float32 rounding of other chunk splits",
        "a second round trip each",
        "`target` | `clean_top` (default)",
        "the target's direction is read out",
    ]
    for line in history:
        assert history_phrases(line), f"not caught: {line}"
    for line in science:
        assert not history_phrases(line), f"caught wrongly: {line}"


def history_phrases(text: str) -> list[str]:
    return [m.group(0) for pattern in HISTORY for m in re.finditer(pattern, text, flags=re.I)]


def test_pages_speak_to_users_not_of_history() -> None:
    """History, issue numbers, rounds and targets belong in CHANGELOG.md, not in the README or docs/."""
    found = []
    for page in pages():
        for number, line in enumerate(page.read_text().splitlines(), 1):
            found += [f"{rel(page)}:{number}: {phrase!r} in {line.strip()[:90]!r}" for phrase in history_phrases(line)]
    assert not found, "development history in user-facing pages (move it to CHANGELOG.md):\n" + "\n".join(found)


# --- commands, flags and settings exist -------------------------------------------------------------------------


def cli_commands() -> dict[str, Any]:
    """'serve', 'keys create', … → the command (typer's click objects), with every option name it accepts."""
    group = typer.main.get_command(cli_app)
    commands: dict[str, Any] = {}
    for name, command in getattr(group, "commands", {}).items():
        commands[name] = command
        for sub, subcommand in getattr(command, "commands", {}).items():
            commands[f"{name} {sub}"] = subcommand
    assert {"serve", "submit", "keys create"} <= set(commands)
    return commands


def cli_invocations() -> Iterator[tuple[str, str]]:
    """(page, command line) for every `hydra-ablate …` in the pages' code blocks and inline code."""
    for page in pages():
        text = page.read_text()
        lines = [line for block in code_blocks(text) for line in block.replace("\\\n", " ").splitlines()]
        lines += re.findall(r"`(hydra-ablate [^`]+)`", text)
        for line in lines:
            for part in re.split(r";|&&|\|", line.split("#")[0]):
                part = part.strip()
                if part.startswith("hydra-ablate "):
                    yield rel(page), part


def test_documented_cli_commands_and_flags_exist() -> None:
    commands = cli_commands()
    seen = 0
    for page, line in cli_invocations():
        words = line.split()[1:]
        name = " ".join(words[:2]) if " ".join(words[:2]) in commands else words[0] if words else ""
        if name in ("COMMAND", "--help", ""):
            continue  # the command's own help, or a placeholder
        assert name in commands, f"{page}: `{line}` names no hydra-ablate command"
        options = {opt for param in commands[name].params for opt in (*param.opts, *param.secondary_opts)}
        options.add("--help")
        for flag in re.findall(r"(?<![\w-])(--?[a-z][a-z-]*)", line):
            assert flag in options, f"{page}: `{line}`: hydra-ablate {name} has no {flag}"
        seen += 1
    assert seen >= 20, f"only {seen} hydra-ablate command lines found in the docs"


def test_flags_named_in_the_cli_guide_exist() -> None:
    """Every `--flag` the command-line guide names in its prose is an option of some hydra-ablate command."""
    options = {opt for command in cli_commands().values() for param in command.params for opt in param.opts}
    text = (DOCS / "guides" / "cli.md").read_text()
    named = set(re.findall(r"`(--[a-z][a-z-]*)", text))
    assert len(named) > 30
    assert named - options == set(), f"flags in docs/guides/cli.md that no command has: {named - options}"


def code_text(*extra: str) -> str:
    folders = ("service", "worker", "cli", "clients/python/hydra_ablate_client", *extra)
    return "\n".join(path.read_text() for folder in folders for path in (ROOT / folder).rglob("*.py"))


def test_documented_settings_are_read_by_the_code() -> None:
    """Every HYDRA_* variable a page names is read somewhere: by the code, or by the compose file, the tests and the
    bench scripts for the variables that belong to them (HYDRA_TAG, HYDRA_UI_SCREENSHOTS, …)."""
    source = code_text("tests", "bench") + (ROOT / "docker-compose.yml").read_text()
    documented = {name for page in pages() for name in re.findall(r"\bHYDRA_[A-Z_]+[A-Z]\b", page.read_text())}
    assert len(documented) > 30
    # Read as a string literal ("HYDRA_X") or a compose interpolation (${HYDRA_X:-default}).
    missing = sorted(name for name in documented if not re.search(rf"[\"'{{]{name}[\"'}}:]", source))
    assert not missing, f"environment variables in the docs that nothing reads: {missing}"


def test_configuration_page_lists_every_setting() -> None:
    source = code_text()
    read = set(re.findall(r"[\"'](HYDRA_[A-Z_]+[A-Z])[\"']", source)) | {"REDIS_URL"}
    page = (DOCS / "operations" / "configuration.md").read_text()
    listed = set(re.findall(r"^\| `([A-Z_]+)`", page, flags=re.M))
    assert read - listed == set(), f"settings read by the code, missing on the configuration page: {read - listed}"


# --- the script a researcher starts from ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def live_url(celery_worker: object, stack_env: dict[str, str]) -> Iterator[str]:
    from service.api.app import create_app
    from service.core.settings import Settings
    from tests.live_server import serve

    with serve(create_app(Settings.from_env())) as url:
        yield url


@pytest.mark.slow
def test_first_sweep_script_runs_end_to_end(live_url: str, tmp_path: Path) -> None:
    """docs/examples/first_sweep.py against the real stack and SmolLM2: its table is the service's summary, and
    it draws its figure."""
    from hydra_ablate_client import HydraClient

    figure = tmp_path / "sweep.png"
    script = DOCS / "examples" / "first_sweep.py"
    run = subprocess.run(
        [sys.executable, str(script), "--url", live_url, "--limit", "4", "--samples", "2", "--out", str(figure)],
        capture_output=True, text=True, timeout=540, cwd=tmp_path, check=False,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    job_id = re.search(r"job ([0-9a-f]{32}) queued", run.stdout)
    assert job_id, run.stdout

    # The per-layer means it printed are the service's own per-component means (summary), to the 3 decimals shown.
    with HydraClient(live_url) as client:
        result = client.result(job_id.group(1))
    assert result.model == "smollm2-135m" and len(result.prompts) == 4
    printed: dict[str, list[float]] = {}
    kind = None
    for line in run.stdout.splitlines():  # pandas prints a MultiIndex's first level once per group
        match = re.match(r"^(attn|mlp)?\s+(\d+)\s+(-?\d+\.\d+)\s+(-?\d+\.\d+)\s+(-?\d+\.\d+)$", line)
        if match:
            kind = match.group(1) or kind
            printed[f"{kind}.{match.group(2)}"] = [float(match.group(i)) for i in (3, 4, 5)]
    assert len(printed) == 60, run.stdout
    for component, stats in zip(result.components, result.summary.components, strict=True):
        expected = [stats.direct_effect_mean, stats.total_effect_mean, stats.compensation_mean]
        assert printed[component] == pytest.approx(expected, abs=6e-4), component

    data = figure.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert (int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")) == (1200, 450)
