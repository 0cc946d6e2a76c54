"""Prompt length in tokens: prompts longer than `max_prompt_tokens` are refused with 422 before they reach a GPU.

The workers publish each model's tokenizer (Hugging Face `tokenizers` JSON) in Redis; the API counts a job's
prompts with it. The `tokenizers` package is Rust, no torch.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from hydra_ablate_client.wire import JobSpec, ModelInfo
from service.core.errors import ValidationProblem
from service.core.patch_tokens import check_pair_tokens
from service.core.settings import Settings
from service.core.store import JobStore

try:  # optional at run time: without it the token cap is skipped, the character cap still applies
    from tokenizers import Tokenizer
except ImportError:  # pragma: no cover - installed with transformers
    Tokenizer = None  # type: ignore[assignment,misc]

logger = logging.getLogger(__name__)


class TokenCounters:
    """Per-model token counters built from the published tokenizer JSON, re-read at most every `refresh_s`.

    Parsing a 50k-vocabulary tokenizer takes ~0.1 s, so a parsed one is kept and only rebuilt when the published
    JSON changes; the short refresh means a worker publishing a new tokenizer is noticed within a minute.

    Single flight: one thread per model fetches and parses; on a cold start the others wait for it (50 concurrent
    first submits used to fetch and parse the same 1.6 MB fifty times), and on a refresh they keep using the
    previous tokenizer meanwhile.
    """

    def __init__(self, refresh_s: float = 60.0) -> None:
        self.refresh_s = refresh_s
        self._lock = threading.Lock()
        self._cache: dict[str, tuple[float, str | None, Any]] = {}  # model -> (fetched at, JSON digest, tokenizer)
        self._flights: dict[str, threading.Lock] = {}  # model -> held by the thread loading it
        self.loads = 0  # tokenizers fetched and parsed (for tests and benchmarks)

    def get(self, store: JobStore, model_id: str) -> Any | None:
        """The model's tokenizers.Tokenizer, or None when none is published (or the package is missing)."""
        if Tokenizer is None:
            return None
        with self._lock:
            cached = self._cache.get(model_id)
            flight = self._flights.setdefault(model_id, threading.Lock())
        if cached is not None and time.monotonic() - cached[0] < self.refresh_s:
            return cached[2]
        if not flight.acquire(blocking=cached is None):
            return cached[2] if cached is not None else None  # another thread refreshes it: use the one we have
        try:
            with self._lock:
                cached = self._cache.get(model_id)  # the thread we waited for may have loaded it
            if cached is not None and time.monotonic() - cached[0] < self.refresh_s:
                return cached[2]
            return self._load(store, model_id, cached)
        finally:
            flight.release()

    def keep_warm(
        self,
        store: JobStore,
        stop: threading.Event,
        idle_s: float = 1.0,
        models: Callable[[], Iterable[ModelInfo]] | None = None,
    ) -> None:
        """Parse every advertised model's tokenizer ahead of the requests that need it, and refresh each one before
        it goes stale, until `stop` is set: run in a background thread, so a request never pays for a parse (a
        burst of first submits used to queue behind one), only a model advertised in the last `idle_s` may.
        `models` reads the advertised models (default `store.models`; the app's reads them into its
        ServedModels on the way). Redis errors are skipped: the next round tries again, and a request still loads
        on its own."""
        if Tokenizer is None and models is None:
            return
        read_models = models or store.models
        while not stop.is_set():
            try:
                for info in read_models():
                    if Tokenizer is None:
                        continue
                    with self._lock:
                        cached = self._cache.get(info.id)
                    if cached is None or time.monotonic() - cached[0] > self.refresh_s / 2:
                        self.refresh(store, info.id)
            except Exception as error:  # noqa: BLE001 - Redis away or a malformed record: try again next round
                logger.debug("tokenizer warm-up skipped a round: %s", error)
            stop.wait(idle_s)

    def recent(self, model_id: str) -> tuple[bool, Any | None]:
        """(True, the tokenizer or None when none is published) when a fresh one is kept; (False, None) when `get`
        would read Redis. For the event loop, which must not."""
        if Tokenizer is None:
            return True, None
        with self._lock:
            cached = self._cache.get(model_id)
        if cached is not None and time.monotonic() - cached[0] < self.refresh_s:
            return True, cached[2]
        return False, None

    def refresh(self, store: JobStore, model_id: str) -> None:
        """Fetch (and parse when it changed) one model's tokenizer now, unless another thread is doing so."""
        with self._lock:
            flight = self._flights.setdefault(model_id, threading.Lock())
        if not flight.acquire(blocking=False):
            return
        try:
            with self._lock:
                cached = self._cache.get(model_id)
            self._load(store, model_id, cached)
        finally:
            flight.release()

    def _load(self, store: JobStore, model_id: str, cached: tuple[float, str | None, Any] | None) -> Any | None:
        now = time.monotonic()
        text = store.tokenizer_json(model_id)
        digest = None if text is None else hashlib.sha256(text.encode()).hexdigest()
        if cached is not None and cached[1] == digest:
            tokenizer = cached[2]
        else:
            tokenizer = None if text is None else _parse(text)
            self.loads += 1
        with self._lock:
            self._cache[model_id] = (now, digest, tokenizer)
        return tokenizer


def _parse(text: str) -> Any | None:
    try:
        return Tokenizer.from_str(text)
    except Exception:  # noqa: BLE001 - a malformed publication must not take submissions down: skip the check
        return None


def check_prompt_tokens(spec: JobSpec, tokenizer_for: Callable[[str], Any | None], settings: Settings) -> None:
    """422 naming the first prompt over `max_prompt_tokens` (with its count); nothing to do without a tokenizer."""
    if spec.intervention == "patch":  # pairs: equal lengths and one-token answers too (service/core/patch_tokens.py)
        check_pair_tokens(spec, tokenizer_for, settings)
        return
    if settings.max_prompt_tokens <= 0:
        return
    if spec.max_tokens is not None and spec.max_tokens <= settings.max_prompt_tokens:
        return  # every text is cut to max_tokens before it reaches the model
    tokenizer = tokenizer_for(spec.model)
    if tokenizer is None:
        return
    # One prompt at a time: encode_batch hands the prompts to a pool of threads that spin while they wait, twice
    # the CPU for the few short prompts of a typical job, on cores the API shares.
    for index, prompt in enumerate(spec.prompts):
        count = len(tokenizer.encode(prompt).ids)
        if count > settings.max_prompt_tokens:
            raise ValidationProblem(
                f"prompts[{index}] is {count:,} tokens long for model {spec.model}, above this server's limit of "
                f"{settings.max_prompt_tokens:,} tokens per prompt; shorten it",
                f"prompts[{index}]",
            )
