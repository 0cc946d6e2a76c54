"""The worker's broker transport: kombu's Redis transport, where Redis refusing writes counts as a lost connection.

A Redis that is full (maxmemory, noeviction) or cannot write its append-only file still answers, but refuses
writes, and kombu writes on every message it takes (the unacked index) and acknowledges. Kombu raises those
refusals as channel errors, which Celery's consumer does not handle: the worker exited ("Unrecoverable error:
OutOfMemoryError") and its running chunk could not even record its failure. Counted as connection errors instead,
they make the consumer reconnect with Celery's own backoff until Redis accepts writes again; the running chunk
rides the refusal out meanwhile (worker/redis_retry.py), and a message taken back on reconnection runs again as a
no-op (its chunk is done or leased). Used by the worker app only (worker/celery_app.py, `broker_transport`).
"""

from __future__ import annotations

from kombu.transport import redis as kombu_redis

from service.core.redis_refusals import REFUSAL_ERRORS, register_refusal_errors

register_refusal_errors()  # MISCONF replies raise WritesRefused (a class, so the tuple below can name it)


class Transport(kombu_redis.Transport):
    connection_errors = (*kombu_redis.Transport.connection_errors, *REFUSAL_ERRORS)
