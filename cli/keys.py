"""`hydra-ablate keys create|list|revoke`: manage API keys in the Redis the API reads (REDIS_URL, HYDRA_KEY_PREFIX).

Talks to Redis directly rather than through the API: creating the first key cannot need a key, and whoever can
reach the service's Redis already controls everything in it. Only digests are stored; a new key is printed once.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Annotated

import redis
import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from cli.stack import default_data_dir
from service.core.api_keys import KeyRing, parse_api_keys
from service.core.embedded_redis import running_embedded_url
from service.core.redaction import redact
from service.core.settings import Settings, env_raw

keys_app = typer.Typer(
    help="Manage API keys (stored hashed in the Redis at REDIS_URL, under HYDRA_KEY_PREFIX).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out = Console()
err = Console(stderr=True)


def _fail(message: str) -> typer.Exit:
    err.print(Text.assemble(("error: ", "bold red"), (message, "red")), soft_wrap=True)
    return typer.Exit(1)


def keys_settings() -> tuple[Settings, set[str]]:
    """Settings whose Redis is the API's: REDIS_URL, or else the embedded Redis of a running `hydra-ablate serve`.

    Without REDIS_URL the settings' default (127.0.0.1:6379) is some other Redis, never the embedded one (that
    listens on a free port): writing keys there would silently do nothing for the API, so that is refused.
    Also returns the names of the keys HYDRA_API_KEYS defines.
    """
    try:
        settings = Settings.from_env()
        env_names = {principal.name for principal in parse_api_keys(settings.api_keys).values()}
    except ValueError as exc:
        raise _fail(str(exc)) from None
    if env_raw("REDIS_URL"):
        return settings, env_names
    data_dir = default_data_dir() / "redis"
    url = running_embedded_url(data_dir)
    if url is None:
        raise _fail(
            "REDIS_URL is not set and no `hydra-ablate serve` with its embedded Redis is running "
            f"(looked in {data_dir}); set REDIS_URL to the Redis your API uses"
        )
    err.print(f"using the embedded Redis of the running `hydra-ablate serve` ({redact(url)})", highlight=False)
    return replace(settings, redis_url=url), env_names


@contextmanager
def key_ring(settings: Settings | None = None) -> Iterator[KeyRing]:
    """The key ring of the configured Redis; connection and validation errors end in one red line, exit code 1."""
    settings = settings or keys_settings()[0]
    client = redis.Redis.from_url(settings.redis_url, socket_connect_timeout=5)
    try:
        yield KeyRing(client, settings.key_prefix)
    except redis.RedisError as exc:
        raise _fail(f"cannot use Redis at {redact(settings.redis_url)} (set REDIS_URL): {exc}") from None
    except ValueError as exc:
        raise _fail(str(exc)) from None
    finally:
        client.close()


@keys_app.command()
def create(
    name: Annotated[str, typer.Argument(help="who the key is for; jobs submitted with it are owned by this name")],
    admin: Annotated[bool, typer.Option("--admin", help="may see and cancel every key's jobs")] = False,
) -> None:
    """Create a key and print it once (only its SHA-256 digest is stored)."""
    settings, env_names = keys_settings()
    if name in env_names:
        raise _fail(
            f"a key named {name!r} is defined in HYDRA_API_KEYS; choose another name (two keys with one name "
            "would own the same jobs and `revoke` could not tell them apart)"
        )
    with key_ring(settings) as ring:
        key = ring.create(name, admin=admin)
    out.print(key, highlight=False, soft_wrap=True)
    role = "admin key" if admin else "key"
    err.print(f"created {role} {name!r}; it is shown only now: send it as X-API-Key (or set HYDRA_API_KEY)")


@keys_app.command("list")
def list_keys() -> None:
    """The keys' names, roles and creation times (never the keys)."""
    with key_ring() as ring:
        records = ring.list()
    table = Table("name", "role", "created")
    for record in records:
        table.add_row(record.name, "admin" if record.admin else "user", record.created_at)
    (out if out.is_terminal else Console(width=200)).print(table)


@keys_app.command()
def revoke(name: Annotated[str, typer.Argument(help="the key's name")]) -> None:
    """Delete the key named NAME; requests with it get 401 at once. Its jobs stay (admins still see them)."""
    settings, env_names = keys_settings()
    with key_ring(settings) as ring:
        removed = ring.revoke(name)
    if not removed and name in env_names:
        raise _fail(
            f"the key {name!r} comes from the environment (HYDRA_API_KEYS), not from Redis: remove its entry from "
            "HYDRA_API_KEYS where the API is configured and restart the API"
        )
    if not removed:
        raise _fail(f"no key named {name!r}")
    out.print(f"revoked {name!r}", highlight=False)
