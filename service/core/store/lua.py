"""The store's Lua scripts, one `.lua` file each beside this module."""

from __future__ import annotations

from service.core import lua_scripts


def lua(*names: str) -> str:
    """The scripts `names` (files `{name}.lua` in this package), joined: helpers first, then the script."""
    return lua_scripts.lua("service.core.store", *names)
