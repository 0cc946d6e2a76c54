"""Which rendered figures of a job are cached (figures:{id}), so deleting the job finds every size of them
(service/rendering/figure_cache.py renders and names them)."""

from __future__ import annotations

from service.core.store.base import StoreBase
from service.core.store.job_records import text
from service.core.store.lua import lua

CACHE_FIGURE = lua("cache_figure")


class CachedFigures(StoreBase):
    def cache_figure(self, job_id: str, key: str, data: bytes, margin_ms: int = 100) -> bool:
        """Cache a rendered figure until the job's result expires and remember its key, so deleting the job finds
        every size of it; False (nothing cached) when the result is gone, e.g. the job was deleted meanwhile
        (cache_figure.lua checks and writes in one step)."""
        script = self.client.register_script(CACHE_FIGURE)
        keys = [key, self.keys.figures(job_id), self.keys.result(job_id)]
        return bool(script(keys=keys, args=[data, self.ttl_s * 1000, margin_ms]))

    def cached_figure_keys(self, job_id: str) -> list[str]:
        return [text(key) or "" for key in self.client.smembers(self.keys.figures(job_id))]
