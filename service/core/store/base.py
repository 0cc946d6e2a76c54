"""What every part of the store shares: the Redis client, the key names and the time to live of a job's keys."""

from __future__ import annotations

from collections.abc import Callable

import redis

from hydra_ablate_client.wire import JobStatus
from service.core.redis_keys import RedisKeys


class StoreBase:
    """The connection and key names; the parts of JobStore (service/core/store/jobs.py) add what they store."""

    def __init__(self, client: redis.Redis, key_prefix: str = "hydra:", ttl_s: int = 7 * 24 * 3600) -> None:
        self.client = client
        self.prefix = key_prefix
        self.keys = RedisKeys(key_prefix)
        self.ttl_s = int(ttl_s)
        # Called with a job id after the job reached a final state here (the webhook dispatcher hooks in).
        self.on_finished: Callable[[str], None] | None = None

    def status(self, job_id: str) -> JobStatus | None:
        """The job's status: JobStore's (service/core/store/jobs.py); the event log appends it."""
        raise NotImplementedError
