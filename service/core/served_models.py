"""The models live workers serve, as this API process last read them: at most `max_age_s` old.

Every submit needs the list (to resolve the request's model); reading it is two Redis round trips and a decode of
every model record, a tenth of a submit's cost in a burst of fifty. The API's warm-up thread re-reads it every
half second (service/api/app.py), so the submit route finds a recent list without touching Redis. A list up to two
seconds old only matters at the edges, and both edges are handled: a model that is not in it is looked up afresh
before the request is refused (a worker that advertised a model a moment ago is seen at once), and a model whose
worker has just died may still be accepted for up to two seconds, like a submit that arrived that much earlier
(its job waits for a worker, as any queued job does).
"""

from __future__ import annotations

import threading
import time

from hydra_ablate_client.wire import JobRequest, JobSpec, ModelInfo
from service.core.errors import ValidationProblem
from service.core.resolve import resolve
from service.core.settings import Settings
from service.core.store import JobStore


class ServedModels:
    def __init__(self, max_age_s: float = 2.0) -> None:
        self.max_age_s = max_age_s
        self._lock = threading.Lock()
        self._read_at = -float("inf")
        self._models: dict[str, ModelInfo] = {}

    def models(self, store: JobStore, fresh: bool = False) -> dict[str, ModelInfo]:
        with self._lock:
            if not fresh and time.monotonic() - self._read_at < self.max_age_s:
                return self._models
        models = {info.id: info for info in store.models()}
        with self._lock:
            self._models, self._read_at = models, time.monotonic()
        return models

    def refreshed(self, store: JobStore) -> list[ModelInfo]:
        """Read the list now (and keep it); for the warm-up thread."""
        return list(self.models(store, fresh=True).values())

    def resolve_recent(self, request: JobRequest, settings: Settings) -> JobSpec | None:
        """`resolve` against the kept list without touching Redis; None when the list is older than `max_age_s` or
        does not name the request's model (then `resolve`, in a thread). Other problems of the request raise."""
        with self._lock:
            if time.monotonic() - self._read_at >= self.max_age_s:
                return None
            models = self._models
        try:
            return resolve(request, models, settings, {})
        except ValidationProblem as problem:
            if problem.field != "model":
                raise
        return None

    def resolve(self, request: JobRequest, store: JobStore, settings: Settings) -> JobSpec:
        """`resolve` against the recent list; a request whose model is not in it is resolved again against a
        fresh one, with the refused models (whose reasons its error gives)."""
        try:
            return resolve(request, self.models(store), settings, {})
        except ValidationProblem as problem:
            if problem.field != "model":
                raise
        return resolve(request, self.models(store, fresh=True), settings, store.refused_models())
