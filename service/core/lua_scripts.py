"""Lua scripts kept as `.lua` files beside the module that runs them (package data: see pyproject.toml)."""

from __future__ import annotations

from functools import cache
from importlib.resources import files


@cache
def lua(package: str, *names: str) -> str:
    """The scripts `names` (files `{name}.lua` in `package`), joined: helpers first, then the script."""
    folder = files(package)
    return "\n".join(folder.joinpath(f"{name}.lua").read_text() for name in names)
