"""Webhook delivery attempts of a job (callbacks:{id}), as shown in its status (service/core/callbacks.py sends)."""

from __future__ import annotations

import msgspec

from hydra_ablate_client.wire import CallbackAttempt
from service.core.store.base import StoreBase


def callback_attempts(raw: list[bytes | str] | list[bytes]) -> list[CallbackAttempt]:
    return [msgspec.json.decode(item, type=CallbackAttempt) for item in raw]


class CallbackLog(StoreBase):
    def record_callback(self, job_id: str, attempt: CallbackAttempt) -> None:
        pipe = self.client.pipeline(transaction=False)
        pipe.rpush(self.keys.callbacks(job_id), msgspec.json.encode(attempt))
        pipe.expire(self.keys.callbacks(job_id), self.ttl_s)
        pipe.execute()

    def callbacks(self, job_id: str) -> list[CallbackAttempt]:
        return callback_attempts(self.client.lrange(self.keys.callbacks(job_id), 0, -1))
