"""The store's Lua scripts, one `.lua` file each beside this module (package data: see pyproject.toml)."""

from __future__ import annotations

from functools import cache
from importlib.resources import files


@cache
def lua(*names: str) -> str:
    """The scripts `names` (files `{name}.lua` in this package), joined: helpers first, then the script."""
    folder = files(__package__ or "service.core.store")
    return "\n".join(folder.joinpath(f"{name}.lua").read_text() for name in names)
