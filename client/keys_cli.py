"""`hydra-ablate keys create|list|revoke`: manage API keys in the Redis the API reads (REDIS_URL, HYDRA_KEY_PREFIX).

Talks to Redis directly rather than through the API: creating the first key cannot need a key, and whoever can
reach the service's Redis already controls everything in it. Only digests are stored; a new key is printed once.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated

import redis
import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from service.auth import KeyRing
from service.settings import Settings

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


@contextmanager
def key_ring() -> Iterator[KeyRing]:
    """The key ring of the configured Redis; connection and validation errors end in one red line, exit code 1."""
    try:
        settings = Settings.from_env()
    except ValueError as exc:
        raise _fail(str(exc)) from None
    client = redis.Redis.from_url(settings.redis_url, socket_connect_timeout=5)
    try:
        yield KeyRing(client, settings.key_prefix)
    except redis.RedisError as exc:
        raise _fail(f"cannot use Redis at {settings.redis_url} (set REDIS_URL): {exc}") from None
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
    with key_ring() as ring:
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
    with key_ring() as ring:
        removed = ring.revoke(name)
    if not removed:
        raise _fail(f"no key named {name!r}")
    out.print(f"revoked {name!r}", highlight=False)
