"""Which rendered figures of a job are cached (figures:{id}), so deleting the job finds every size of them
(service/rendering/figure_cache.py renders and names them)."""

from __future__ import annotations

from service.core.store.base import StoreBase
from service.core.store.job_records import text


class CachedFigures(StoreBase):
    def cache_figure(self, job_id: str, key: str, data: bytes, ttl_ms: int) -> None:
        """Cache a rendered figure for `ttl_ms` and remember its key, so deleting the job finds every size of it."""
        pipe = self.client.pipeline(transaction=True)
        pipe.set(key, data, px=ttl_ms)
        pipe.sadd(self.keys.figures(job_id), key)
        pipe.pexpire(self.keys.figures(job_id), ttl_ms)  # every figure of a job expires with its result: same end
        pipe.execute()

    def cached_figure_keys(self, job_id: str) -> list[str]:
        return [text(key) or "" for key in self.client.smembers(self.keys.figures(job_id))]
