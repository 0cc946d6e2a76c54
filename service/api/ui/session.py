"""Web-page sessions: the API key is asked for once and never stored, only its SHA-256 digest, server-side.

The browser holds a random session id in a cookie (HttpOnly, SameSite=Strict, Secure when served over HTTPS). Redis
keeps, under `{prefix}ui:session:{sha256(session id)}`, the session's CSRF token and the digest of the key it
signed in with; the caller is resolved from that digest on every request, so revoking a key ends its sessions at
once. Redis only holds digests: a copy of it can replay neither keys nor sessions.

Every visitor gets a session (anonymous until it signs in) so that even the sign-in form carries a CSRF token, but
an anonymous session stores nothing: its id (`a.` and 32 random bytes) is only in the visitor's cookie, and its
CSRF token is derived from that id (a double-submit token: a page of another site can neither read the cookie nor,
SameSite=Strict, send it). A flood of anonymous visits costs Redis nothing; a session record is written only when
a key signs in (with a new id: no fixation).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio
from litestar.connection import ASGIConnection
from litestar.datastructures import Cookie

from service.core.api_keys import ApiKeys, Principal, key_digest
from service.core.redis_keys import RedisKeys

COOKIE_NAME = "hydra_ui"
COOKIE_PATH = "/ui"
SESSION_TTL_S = 12 * 3600  # a working day; signing in again is one paste
CSRF_FIELD = "csrf_token"
ANONYMOUS = "a."  # the id of a session not signed in starts so; it has no record in Redis
_ANONYMOUS_ID = re.compile(r"a\.[A-Za-z0-9_-]{43}")


def _anonymous_csrf(session_id: str) -> str:
    return hashlib.sha256(b"hydra-ui-csrf\0" + session_id.encode()).hexdigest()


def _str(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _session_key(prefix: str, session_id: str) -> str:
    return RedisKeys(prefix).ui_session(session_id)


@dataclass
class UiSession:
    """One browser's session: who it is (None: not signed in, auth on) and the token its forms must carry."""

    session_id: str
    csrf_token: str
    principal: Principal | None
    auth_enabled: bool
    secure: bool
    is_new: bool = False
    cookies: list[Cookie] = field(default_factory=list)

    def csrf_ok(self, presented: Any) -> bool:
        return isinstance(presented, str) and hmac.compare_digest(presented.encode(), self.csrf_token.encode())

    def cookie(self, session_id: str | None, max_age: int = SESSION_TTL_S) -> Cookie:
        return Cookie(
            key=COOKIE_NAME,
            value=session_id or "",
            path=COOKIE_PATH,
            max_age=max_age,
            httponly=True,
            samesite="strict",
            secure=self.secure,
        )


class UiSessions:
    """Session records in Redis (asyncio client: read on the event loop for every page)."""

    def __init__(self, client: redis.asyncio.Redis, prefix: str, api_keys: ApiKeys, auth_enabled: bool) -> None:
        self.client = client
        self.prefix = prefix
        self.api_keys = api_keys
        self.auth_enabled = auth_enabled

    async def load(self, connection: ASGIConnection[Any, Any, Any, Any]) -> UiSession:
        """The caller's session, or a fresh anonymous one (its cookie is set with the response)."""
        secure = connection.url.scheme == "https"
        session_id = connection.cookies.get(COOKIE_NAME, "")
        if _ANONYMOUS_ID.fullmatch(session_id):
            principal = await self._principal("")
            return UiSession(session_id, _anonymous_csrf(session_id), principal, self.auth_enabled, secure)
        record: dict[str, str] = {}
        if session_id:
            raw = await self.client.hgetall(_session_key(self.prefix, session_id))
            record = {_str(k): _str(v) for k, v in raw.items()}
        if not record.get("csrf"):
            return await self._anonymous(secure)
        principal = await self._principal(record.get("key_digest", ""))
        return UiSession(session_id, record["csrf"], principal, self.auth_enabled, secure)

    async def _anonymous(self, secure: bool) -> UiSession:
        """A new session that is not signed in: a cookie only, nothing in Redis."""
        session_id = ANONYMOUS + secrets.token_urlsafe(32)
        principal = await self._principal("")
        session = UiSession(session_id, _anonymous_csrf(session_id), principal, self.auth_enabled, secure, is_new=True)
        session.cookies.append(session.cookie(session_id))
        return session

    async def _principal(self, digest: str) -> Principal | None:
        if not self.auth_enabled:
            return await self.api_keys.principal(None, self.client)
        if not digest:
            return None
        return await self.api_keys.principal_for_digest(digest, self.client)

    async def _create(self, secure: bool, digest: str = "") -> UiSession:
        session_id, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
        key = _session_key(self.prefix, session_id)
        await self.client.hset(key, mapping={"csrf": csrf, "key_digest": digest})
        await self.client.expire(key, SESSION_TTL_S)
        session = UiSession(session_id, csrf, await self._principal(digest), self.auth_enabled, secure, is_new=True)
        session.cookies.append(session.cookie(session_id))
        return session

    async def sign_in(self, session: UiSession, api_key: str) -> UiSession | None:
        """A new session (new id and token: no fixation) for a valid key; None for an unknown or revoked key."""
        digest = key_digest(api_key)
        if await self.api_keys.principal_for_digest(digest, self.client) is None:
            return None
        if not session.session_id.startswith(ANONYMOUS):
            await self.client.delete(_session_key(self.prefix, session.session_id))
        return await self._create(session.secure, digest)

    async def sign_out(self, session: UiSession) -> None:
        if not session.session_id.startswith(ANONYMOUS):
            await self.client.delete(_session_key(self.prefix, session.session_id))
        session.cookies.append(session.cookie(None, max_age=0))
