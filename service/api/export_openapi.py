"""Write the app's OpenAPI document to a file: `python -m service.api.export_openapi [path]`.

The committed openapi/openapi.json is what clients are generated from; tests/test_openapi.py fails when it
drifts from the live app, and this is how to regenerate it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from service.api.app import create_app
from service.core.settings import Settings

DEFAULT_PATH = Path("openapi/openapi.json")


def openapi_json() -> str:
    """The schema as stable text: sorted keys, two-space indent, trailing newline (diff-friendly)."""
    app = create_app(Settings())  # nothing connects until a request: no Redis needed to export
    return json.dumps(app.openapi_schema.to_schema(), sort_keys=True, indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    path = Path(args[0]) if args else DEFAULT_PATH
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(openapi_json(), encoding="utf-8")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
