"""A finished job's figures, rendered on first request and cached in Redis as long as the result lives.

A result never changes once its job succeeded, so a rendered figure is cached under the store's prefix as
`figure:{job_id}:{name}:{format}` for as long as the result itself lives: the second request is a Redis GET. The
API's figure route and the web pages both read figures through `cached_figure`.
"""

from __future__ import annotations

from dataclasses import dataclass

import msgspec

from hydra_ablate_client.vocabulary import FigureFormat, FigureName
from hydra_ablate_client.wire import JobResult
from service.core.job_actions import finished_result
from service.core.redis_replies import bytes_or_none
from service.core.store import JobStore
from service.rendering.figures import DPI, HEIGHT_PX, WIDTH_PX, render


@dataclass(frozen=True)
class FigureOptions:
    """Size and, for `profile`, which prompt and component; part of the cache key."""

    width: int = WIDTH_PX
    height: int = HEIGHT_PX
    dpi: int = DPI
    prompt: int | None = None
    component: str | None = None

    def key_suffix(self) -> str:
        """Empty for the defaults, so the default figure keeps its plain key."""
        if self == FigureOptions():
            return ""
        return f":{self.width}x{self.height}@{self.dpi}:{self.prompt}:{self.component}"


def figure_key(store: JobStore, job_id: str, name: str, fmt: str, options: FigureOptions | None = None) -> str:
    return store.keys.figure(job_id, name, fmt, (options or FigureOptions()).key_suffix())


def cached_figure(
    store: JobStore, job_id: str, name: FigureName, fmt: FigureFormat, options: FigureOptions | None = None
) -> bytes:
    """The figure from the cache, else rendered from the stored result and cached until the result expires;
    FigureOptionError (service/rendering/figure_style.py) for options the result cannot satisfy, or a figure that
    does not draw this kind of job (it names the ones that do)."""
    options = options or FigureOptions()
    key = figure_key(store, job_id, name, fmt, options)
    cached = bytes_or_none(store.client.get(key))
    if cached is not None:
        return cached
    result = msgspec.json.decode(finished_result(store, job_id), type=JobResult)
    data = render(result, name, fmt, width=options.width, height=options.height, dpi=options.dpi,
                  prompt=options.prompt, component=options.component)
    # Cached until the result expires, and not at all when the job was deleted while this rendered (one script).
    store.cache_figure(job_id, key, data)
    return data
