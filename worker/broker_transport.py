"""The worker's broker transport: kombu's Redis transport, where Redis refusing writes counts as a lost connection.

A Redis that is full (maxmemory, noeviction) or cannot write its append-only file still answers, but refuses
writes, and kombu writes on every message it takes (the unacked index) and acknowledges. Kombu raises those
refusals as channel errors, which Celery's consumer does not handle: the worker exited ("Unrecoverable error:
OutOfMemoryError") and its running chunk could not even record its failure. Counted as connection errors instead,
they make the consumer reconnect with Celery's own backoff until Redis accepts writes again; the running chunk
rides the refusal out meanwhile (worker/redis_retry.py), and a message taken back on reconnection runs again as a
no-op (its chunk is done or leased).

An acknowledgement refused by Redis used to keep its message's place in the prefetch window for good (kombu drops
it from its own books only after Redis took the ack), so the worker never took another message. Here the place is
freed; the message stays in Redis's unacked index and comes back after the visibility timeout, a no-op then.

Used by the worker app only (worker/celery_app.py, `broker_transport`).
"""

from __future__ import annotations

import logging

from kombu.transport import redis as kombu_redis
from kombu.transport import virtual

from service.core.redis_refusals import REFUSAL_ERRORS, is_write_refusal, register_refusal_errors

log = logging.getLogger(__name__)
register_refusal_errors()  # MISCONF replies raise WritesRefused (a class, so the tuple below can name it)


class QoS(kombu_redis.QoS):
    def ack(self, delivery_tag: str) -> None:
        try:
            self._remove_from_indices(delivery_tag).execute()
        except Exception as error:
            if not is_write_refusal(error):
                raise
            log.warning(
                "Redis refused the acknowledgement of message %s (%s); it comes back after the visibility timeout "
                "and runs as a no-op then", delivery_tag, error,
            )
        virtual.QoS.ack(self, delivery_tag)


class Channel(kombu_redis.Channel):
    QoS = QoS


class Transport(kombu_redis.Transport):
    Channel = Channel
    connection_errors = (*kombu_redis.Transport.connection_errors, *REFUSAL_ERRORS)
