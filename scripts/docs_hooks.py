"""MkDocs hooks (mkdocs.yml `hooks:`): repository files the pages link to, published beside them.

Strict mode rejects a link that leaves docs/, and the pages link to the OpenAPI document and to the raw benchmark
numbers, which live in openapi/ and bench/ where the code that writes them expects them. Rather than copies that
could drift, the build adds those files to the site at fixed paths: `reference/openapi.json` and
`results/bench/<name>.json` (link them from a page as `../reference/openapi.json`, `bench/<name>.json`, …).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parent.parent


def published() -> dict[str, Path]:
    """Site path → repository file, for every file outside docs/ that the site serves."""
    files = {"reference/openapi.json": ROOT / "openapi" / "openapi.json"}
    files.update({f"results/bench/{path.name}": path for path in sorted((ROOT / "bench").glob("*.json"))})
    return files


def on_files(files: Files, config: Any) -> Files:
    for uri, path in published().items():
        files.append(File.generated(config, uri, abs_src_path=str(path)))
    return files
