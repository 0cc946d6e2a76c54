"""API keys: who a key belongs to, and the key ring the `hydra-ablate keys` commands manage. No HTTP here.

Keys are random strings shown once; only their SHA-256 digests are kept (Redis hash `{prefix}apikeys`: digest ->
{name, admin, created_at}), so a copy of Redis or of the environment's digests cannot be replayed as a key. A key
of 32 random bytes has far too much entropy for a slow password hash to add anything.

Two sources, both read per request so a revoked key stops working at once:
  - HYDRA_API_KEYS, `name:key[:admin],…`, hashed when the app is built (for deployments configured by env);
  - the Redis key ring, written by `hydra-ablate keys create|revoke`.

The API's middleware that reads the `X-API-Key` header and answers 401 is service/api/auth.py.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

import msgspec
import redis
import redis.asyncio

from service.core.redis_keys import RedisKeys
from service.core.redis_replies import bytes_hash
from service.core.settings import Settings

LOCAL_OWNER = "local"  # who owns every job when auth is off
KEY_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$"  # names become parts of Redis keys: no ':' or spaces
_KEY_NAME = re.compile(KEY_NAME_PATTERN)


@dataclass(frozen=True)
class Principal:
    """The caller: jobs belong to `name`; an admin sees and cancels every job."""

    name: str
    admin: bool = False

    def may_see(self, owner: str | None) -> bool:
        """Jobs of other owners (and unowned jobs from before auth) are visible to admins only."""
        return self.admin or owner == self.name


LOCAL = Principal(LOCAL_OWNER, admin=True)  # auth off: one user, who sees everything


class KeyRecord(msgspec.Struct, kw_only=True):
    """What the key ring keeps about a key: never the key itself."""

    name: str
    admin: bool = False
    created_at: str = ""


def key_digest(key: str) -> str:
    """The stored form of a key (hex SHA-256)."""
    return hashlib.sha256(key.encode()).hexdigest()


def check_name(name: str) -> str:
    """A valid key name; `local` is reserved for the owner of jobs made while auth was off."""
    if name == LOCAL_OWNER:
        raise ValueError(f"the key name {LOCAL_OWNER!r} is reserved (it owns the jobs made while auth is off)")
    if not _KEY_NAME.match(name):
        raise ValueError(
            f"invalid key name {name!r}: use 1-64 letters, digits, '_', '.', '@' or '-', starting with a letter or "
            "digit"
        )
    return name


def parse_api_keys(spec: str) -> dict[str, Principal]:
    """HYDRA_API_KEYS (`name:key[:admin]`, comma-separated) as digest -> Principal; the plain keys are dropped."""
    found: dict[str, Principal] = {}
    for raw in spec.split(","):
        entry = raw.strip()
        if not entry:
            continue
        parts = entry.split(":")
        if len(parts) not in (2, 3) or not parts[1] or (len(parts) == 3 and parts[2] != "admin"):
            raise ValueError("HYDRA_API_KEYS entries must be name:key or name:key:admin, comma-separated")
        name, key = check_name(parts[0]), parts[1]
        found[key_digest(key)] = Principal(name, admin=len(parts) == 3)
    return found


def keys_hash(prefix: str) -> str:
    """The Redis hash holding the key ring."""
    return RedisKeys(prefix).api_keys


def _decode_record(raw: bytes | str) -> KeyRecord | None:
    try:
        return msgspec.json.decode(raw, type=KeyRecord)
    except msgspec.DecodeError:
        return None


class ApiKeys:
    """Resolves a presented key to a Principal: the env keys first, then the Redis key ring."""

    def __init__(self, settings: Settings) -> None:
        self.enabled = settings.auth_enabled
        self.hash_key = keys_hash(settings.key_prefix)
        self._env = parse_api_keys(settings.api_keys)

    async def principal(self, key: str | None, client: redis.asyncio.Redis) -> Principal | None:
        if not self.enabled:
            return LOCAL
        if not key:
            return None
        return await self.principal_for_digest(key_digest(key), client)

    async def principal_for_digest(self, digest: str, client: redis.asyncio.Redis) -> Principal | None:
        """The key whose SHA-256 is `digest` (what a web-page session keeps instead of the key itself)."""
        if not self.enabled:
            return LOCAL
        # Env keys: compare_digest against every one, so timing does not tell how close a guess came.
        match: Principal | None = None
        for known, principal in self._env.items():
            if hmac.compare_digest(known, digest):
                match = principal
        if match is not None:
            return match
        # Key ring: looked up by the digest itself, so the lookup's timing reveals nothing about the key.
        raw = await client.hget(self.hash_key, digest)
        record = None if raw is None else _decode_record(raw)
        return None if record is None else Principal(record.name, admin=record.admin)


class KeyRing:
    """The Redis key ring, synchronous: what the `hydra-ablate keys` commands use."""

    def __init__(self, client: redis.Redis, prefix: str) -> None:
        self.client = client
        self.hash_key = keys_hash(prefix)

    def create(self, name: str, admin: bool = False) -> str:
        """A new random key for `name`; returns the plain key (shown once), stores only its digest.

        One key per name, so `revoke NAME` is unambiguous: an existing name is refused (revoke it first).
        """
        check_name(name)
        if any(record.name == name for _, record in self._records()):
            raise ValueError(f"a key named {name!r} exists already; revoke it first to replace it")
        key = "hk_" + secrets.token_urlsafe(32)
        created = datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
        record = KeyRecord(name=name, admin=admin, created_at=created)
        self.client.hset(self.hash_key, key_digest(key), msgspec.json.encode(record))
        return key

    def list(self) -> list[KeyRecord]:
        """Every key's record, by name."""
        return sorted((record for _, record in self._records()), key=lambda r: r.name)

    def revoke(self, name: str) -> int:
        """Remove the keys named `name`; returns how many were removed (0: no such name)."""
        digests = [digest for digest, record in self._records() if record.name == name]
        return int(self.client.hdel(self.hash_key, *digests)) if digests else 0

    def _records(self) -> Iterable[tuple[bytes, KeyRecord]]:
        for digest, raw in bytes_hash(self.client.hgetall(self.hash_key)).items():
            record = _decode_record(raw)
            if record is not None:
                yield digest, record
