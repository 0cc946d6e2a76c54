"""Connection options shared by every Redis client the service and the workers make.

redis-py sends its name and version to the server on each new connection (CLIENT SETINFO) and, unless told the
version, looks it up with `importlib.metadata` every time: about 10 ms of scanning `sys.path` per connection. A
burst of 50 requests opens up to 50 pooled connections at once, so a fresh API spent most of its first second
there. The version is looked up once per process instead.
"""

from __future__ import annotations

from functools import cache
from typing import Any


@cache
def driver_options() -> dict[str, Any]:
    """Keyword arguments for `Redis.from_url` (sync or asyncio) that carry the driver's version, computed once."""
    from redis.utils import get_lib_version

    try:
        from redis.driver_info import DriverInfo  # redis-py 7+: lib_name/lib_version are deprecated there
    except ImportError:
        return {"lib_version": get_lib_version()}
    return {"driver_info": DriverInfo(lib_version=get_lib_version())}
