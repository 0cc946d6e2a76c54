"""Connection options shared by every Redis client the service and the workers make.

redis-py sends its name and version to the server on each new connection (CLIENT SETINFO) and, unless told the
version, looks it up with `importlib.metadata` every time: about 10 ms of scanning `sys.path` per connection. A
burst of 50 requests opens up to 50 pooled connections at once, so a fresh API spent most of its first second
there. The version is looked up once per process instead.
"""

from __future__ import annotations

from functools import cache
from typing import Any

# How long one read of an ordinary command may take on the API's event-loop client before it fails (503) instead of
# hanging on a Redis that is gone. Set here, not left to redis-py, whose default changed between major versions
# (none before 6, 5 s in 8). Nothing the API sends blocks in Redis: streams and long polls wait on the process's
# subscription (service/core/event_hub.py), which reads with its own, shorter timeout.
COMMAND_TIMEOUT_S = 5.0


@cache
def driver_options() -> dict[str, Any]:
    """Keyword arguments for `Redis.from_url` (sync or asyncio) that carry the driver's version, computed once."""
    from redis.utils import get_lib_version

    try:
        from redis.driver_info import DriverInfo  # redis-py 7+: lib_name/lib_version are deprecated there
    except ImportError:
        return {"lib_version": get_lib_version()}
    return {"driver_info": DriverInfo(lib_version=get_lib_version())}
