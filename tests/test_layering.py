"""The import arrows between the rooms go one way (docs/development.md, "Layout"): an AST walk over every import
of every module, lazy ones inside functions included, fails naming the file, the line and the forbidden arrow."""

from __future__ import annotations

import ast
import subprocess
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCANNED = ("service", "worker", "cli", "clients/python")


@dataclass(frozen=True)
class Rule:
    room: str  # a folder, relative to the repository root
    forbidden: tuple[str, ...]  # module prefixes the room may not import
    why: str
    allowed: tuple[str, ...] = ()  # exceptions to `forbidden` (longer prefixes win)


RULES = (
    Rule(
        "worker/engine",
        ("service", "worker", "cli", "hydra_ablate_client", "redis", "celery", "kombu", "billiard", "litestar",
         "httpx", "uvicorn", "msgspec"),
        "the engine is pure tensors: torch, transformers and the client's vocabulary only",
        allowed=("worker.engine", "hydra_ablate_client.vocabulary"),
    ),
    Rule(
        "worker",
        ("service.api", "service.rendering", "cli", "litestar"),
        "the worker imports the domain core only",
    ),
    Rule(
        "service/core",
        ("service.api", "service.rendering", "worker", "cli", "litestar", "torch", "transformers", "matplotlib"),
        "the domain core knows no HTTP app, rendering, worker, torch or matplotlib",
    ),
    Rule(
        "service/rendering",
        ("service.api", "worker", "cli", "litestar", "torch", "transformers"),
        "rendering never imports the HTTP app, the worker or torch",
    ),
    Rule(
        "service/api",
        ("worker", "cli", "torch", "transformers"),
        "the HTTP app never imports the worker or torch (it sends tasks by name)",
    ),
    Rule(
        "clients/python",
        ("service", "worker", "cli"),
        "the client package is installed alone: nothing of the service, the worker or the CLI",
    ),
)


def _within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def module_name(path: Path, root: Path) -> str:
    relative = path.relative_to(root / "clients" / "python" if path.is_relative_to(root / "clients") else root)
    parts = list(relative.with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(path: Path, root: Path) -> list[tuple[int, str]]:
    """(line, absolute module) for every import in the file; `from a import b` counts as a.b and a."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            found.append((node.lineno, module))
            found.extend((node.lineno, f"{module}.{alias.name}") for alias in node.names if alias.name != "*")
    return found


def rule_for(path: Path, root: Path) -> Rule | None:
    """The most specific rule whose room holds the file (worker/engine before worker)."""
    relative = path.relative_to(root).as_posix()
    rooms = [rule for rule in RULES if relative.startswith(rule.room + "/")]
    return max(rooms, key=lambda rule: len(rule.room)) if rooms else None


def forbidden_arrows(paths: list[Path], root: Path = ROOT) -> list[str]:
    offences: dict[tuple[str, int], str] = {}  # one per import statement: its first forbidden module
    for path in paths:
        rule = rule_for(path, root)
        if rule is None:
            continue
        for line, module in imports(path, root):
            banned = [prefix for prefix in rule.forbidden if _within(module, prefix)]
            excused = [prefix for prefix in rule.allowed if _within(module, prefix)]
            if banned and not (excused and max(map(len, excused)) > max(map(len, banned))):
                where = (path.relative_to(root).as_posix(), line)
                offences.setdefault(where, f"{where[0]}:{line}: {rule.room} → {module} ({rule.why})")
    return [offences[where] for where in sorted(offences)]


def scanned_files() -> list[Path]:
    """The checkout's Python files under SCANNED (tracked, or new and not ignored: no build/ or .venv copies)."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z", "--", *SCANNED],
        cwd=ROOT, capture_output=True, check=True,
    ).stdout.decode().split("\0")
    return sorted(ROOT / path for path in listed if path.endswith(".py") and (ROOT / path).is_file())


def test_no_forbidden_import_arrow() -> None:
    files = scanned_files()
    assert len(files) > 100
    offences = forbidden_arrows(files)
    assert not offences, "forbidden imports:\n" + "\n".join(offences)


def test_the_walk_finds_a_forbidden_arrow_and_names_it(tmp_path: Path) -> None:
    """The check can fail: bad imports in each room (a copy of the layout in a temporary folder) are reported with
    file, line and arrow."""
    bad = {
        "worker/engine/_layering_probe.py": "import torch\nfrom service.core import store\n",
        "service/core/_layering_probe.py": "def f():\n    from service.api.app import create_app\n",
        "service/rendering/_layering_probe.py": "from ..api import app\n",
        "clients/python/hydra_ablate_client/_layering_probe.py": "import worker.tasks\n",
    }
    written = []
    for relative, text in bad.items():
        path = tmp_path / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        written.append(path)
    offences = forbidden_arrows(written, tmp_path)
    assert offences == [
        "clients/python/hydra_ablate_client/_layering_probe.py:1: clients/python → worker.tasks (the client "
        "package is installed alone: nothing of the service, the worker or the CLI)",
        "service/core/_layering_probe.py:2: service/core → service.api.app (the domain core knows no HTTP app, "
        "rendering, worker, torch or matplotlib)",
        "service/rendering/_layering_probe.py:1: service/rendering → service.api (rendering never imports the "
        "HTTP app, the worker or torch)",
        "worker/engine/_layering_probe.py:2: worker/engine → service.core (the engine is pure tensors: torch, "
        "transformers and the client's vocabulary only)",
    ]


def test_the_autograd_reference_imports_nothing_of_the_worker() -> None:
    """tests/autograd_reference.py's hooks are how the attribution tests check the engine independently: an import of
    worker/ there (the engine's passes, or code that calls them) would let the engine check itself."""
    path = ROOT / "tests" / "autograd_reference.py"
    found = imports(path, ROOT)
    assert any(_within(module, "torch") for _line, module in found)  # the walk reads the file's imports
    offences = [f"line {line}: {module}" for line, module in found if _within(module, "worker")]
    assert not offences, f"{path.name} imports the worker: {offences}"


# Module names that appear in two rooms because they are the same concept at two ends (the rule of names).
SAME_CONCEPT = {
    "errors.py": {"service/core/errors.py", "worker/engine/errors.py"},  # the domain's errors, the engine's error
    "figures.py": {"service/api/controllers/figures.py", "service/rendering/figures.py"},  # the route, the drawing
    "jobs.py": {"service/api/controllers/jobs.py", "service/core/store/jobs.py"},  # the route, the stored job
}


def test_no_two_modules_share_a_name_unless_they_are_one_concept() -> None:
    by_name: dict[str, set[str]] = {}
    for path in scanned_files():
        if path.name != "__init__.py":
            by_name.setdefault(path.name, set()).add(path.relative_to(ROOT).as_posix())
    repeated = {name: paths for name, paths in by_name.items() if len(paths) > 1}
    unexplained = {name: sorted(paths) for name, paths in repeated.items() if SAME_CONCEPT.get(name) != paths}
    assert not unexplained, f"modules named alike (rename one, or say why in SAME_CONCEPT): {unexplained}"


def test_redis_key_names_are_built_in_one_module() -> None:
    """No f-string starts with a key prefix outside service/core/redis_keys.py (f"{prefix}job:{id}" and the like)."""
    builders = []
    for path in scanned_files():
        if path == ROOT / "service" / "core" / "redis_keys.py" or path.is_relative_to(ROOT / "clients"):
            continue  # the client package never talks to Redis
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.JoinedStr) and node.values and isinstance(node.values[0], ast.FormattedValue):
                first = ast.unparse(node.values[0].value)
                if first.split(".")[-1] in ("prefix", "key_prefix"):
                    builders.append(f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)}")
    assert not builders, "build key names in service/core/redis_keys.py:\n" + "\n".join(builders)


def test_lua_scripts_live_in_lua_files() -> None:
    """Every Redis script is a `.lua` file beside the module that loads it (service/core/lua_scripts.py), not a
    string inside Python: a Lua body in a .py file is one that ruff, mypy and a Lua linter all skip."""
    inline = [
        f"{path.relative_to(ROOT)}:{number}"
        for path in scanned_files()
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if "redis.call(" in line
    ]
    assert not inline, "Lua inside Python (move it to a .lua file beside the module):\n" + "\n".join(inline)
    scripts = [path for path in ROOT.joinpath("service").rglob("*.lua")]
    assert len(scripts) >= 23  # the store's, the chunk book's, the leases', the API's idempotency and rate scripts
