"""Webhooks: a job's final status POSTed to its callback_url, signed, timestamped and retried with backoff.

No torch and no HTTP framework here: the API (cancel) and the worker (success, failure) both hand finished jobs
to `hydra.deliver_callback` (worker/callback_delivery.py), which calls `deliver` once per attempt and schedules the
next.

Signature (per API key; the key's owner reads its secret at GET /v1/webhooks/secret):
    Hydra-Timestamp: <unix seconds>
    Hydra-Signature: v1=<hex HMAC-SHA256(secret, "<timestamp>." + body)>
A receiver recomputes the HMAC over the raw body, compares with `hmac.compare_digest`, and rejects timestamps
older than a few minutes. `verify` below does exactly that. A signature verifies again for as long as its timestamp
is accepted (5 minutes), so a receiver that must not act twice also keeps the signatures it accepted for that long
and refuses one it has seen (docs/guides/events-and-webhooks.md shows how); `Hydra-Delivery` (`<job id>.<attempt>`)
is not signed.

Deliveries run on the webhook queue, never in a process that runs chunks (worker/callback_delivery.py), each bounded
in all by HYDRA_CALLBACK_TIMEOUT_S and connected to the address that was checked (service/core/webhook_http.py).
"""

from __future__ import annotations

import hashlib
import hmac
import http.client
import secrets
import time
from collections.abc import Callable

import msgspec
import redis

from hydra_ablate_client.wire import CallbackAttempt
from service.core.labels import CallbackRefused, IpNetwork, resolve_callback
from service.core.redis_keys import RedisKeys
from service.core.store import JobStore, utc_now
from service.core.webhook_http import DeliveryTimeout, post

SIGNATURE_HEADER = "Hydra-Signature"
TIMESTAMP_HEADER = "Hydra-Timestamp"
DELIVERY_HEADER = "Hydra-Delivery"
TOLERANCE_S = 300


def secrets_key(prefix: str) -> str:
    return RedisKeys(prefix).callback_secrets


def key_secret(client: redis.Redis, prefix: str, owner: str) -> str:
    """The owner's signing secret, made on first use (HSETNX, so concurrent first uses agree)."""
    client.hsetnx(secrets_key(prefix), owner, secrets.token_hex(32))
    raw = client.hget(secrets_key(prefix), owner)
    assert raw is not None  # just set
    return raw.decode() if isinstance(raw, bytes) else str(raw)


def sign(secret: str, timestamp: int, body: bytes) -> str:
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"v1={digest}"


def verify(secret: str, headers: dict[str, str], body: bytes, now: float | None = None) -> bool:
    """What a receiver runs: the signature matches and the timestamp is recent."""
    lowered = {k.lower(): v for k, v in headers.items()}
    try:
        timestamp = int(lowered[TIMESTAMP_HEADER.lower()])
    except (KeyError, ValueError):
        return False
    if abs((now or time.time()) - timestamp) > TOLERANCE_S:
        return False
    return hmac.compare_digest(sign(secret, timestamp, body), lowered.get(SIGNATURE_HEADER.lower(), ""))


def backoff_s(attempt: int, base_s: float) -> float:
    """Delay before attempt `attempt + 1`: base, 2·base, 4·base, … (capped at an hour)."""
    return float(min(3600.0, base_s * 2 ** (attempt - 1)))


def deliver(
    store: JobStore, job_id: str, attempt: int, allowed: tuple[IpNetwork, ...], timeout_s: float
) -> CallbackAttempt | None:
    """One POST of the job's status to its callback_url, recorded on the job; None when there is nothing to send."""
    status = store.status(job_id)
    if status is None or status.callback_url is None:
        return None
    body = msgspec.json.encode(status)
    secret = key_secret(store.client, store.prefix, status.owner or "local")
    timestamp = int(time.time())
    headers = {
        "Content-Type": "application/json",
        "User-Agent": "hydra-ablate-webhook/1",
        TIMESTAMP_HEADER: str(timestamp),
        SIGNATURE_HEADER: sign(secret, timestamp, body),
        DELIVERY_HEADER: f"{job_id}.{attempt}",
    }
    started = time.perf_counter()
    code: int | None = None
    error: str | None = None
    try:
        # Checked again (the host may resolve elsewhere by now), and the POST goes to the address checked here.
        target = resolve_callback(status.callback_url, allowed)
        code = post(target, body, headers, timeout_s)  # the whole delivery within timeout_s; no redirects
        if not 200 <= code < 300:
            error = f"the receiver answered {code}"
    except CallbackRefused as exc:
        error = f"refused: {exc}"
    except DeliveryTimeout as exc:
        error = str(exc)
    except (OSError, ValueError, http.client.HTTPException) as exc:  # unreachable, TLS, not HTTP
        error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    record = CallbackAttempt(
        attempt=attempt,
        at=utc_now(),
        status_code=code,
        error=error,
        duration_ms=round((time.perf_counter() - started) * 1000, 3),
        delivered=error is None,
    )
    store.record_callback(job_id, record)
    return record


def finish_hook(store: JobStore, send: Callable[[str], None]) -> Callable[[str], None]:
    """The JobStore.on_finished hook: queue a delivery for finished jobs that asked for one."""

    def on_finished(job_id: str) -> None:
        if store.client.hget(store.keys.job(job_id), "callback_url"):
            send(job_id)

    return on_finished


