"""The worker's own settings, read and checked once when the worker starts (the API has service/core/settings.py).

A bad value stops the worker at start-up with a message naming the variable, instead of failing every job it
takes. Settings the API and the worker share (Redis, queue, chunks and time limits) are in service/core/settings.py;
every variable is listed in service/core/configuration.py.
"""

from __future__ import annotations

from dataclasses import dataclass

from service.core.settings import env_float, env_int, env_text

# A chunk sent (or sent again by a sweep) that has not started within this many leases is looked for by a sweep,
# and sent once more when its message is gone (lost with a Redis crash); a long queue only gets a duplicate that
# far apart, which runs as a no-op.
RECHECK_LEASES = 10
DTYPE_NAMES = ("float32", "bfloat16", "float16")  # the keys of worker.model_cache.DTYPES (checked there)
DEFAULT_CLEAN_CACHE_BYTES = 1 << 30


class WorkerConfigError(ValueError):
    """A worker setting is malformed or inconsistent; the worker does not start."""


def _bytes_or_zero(name: str, default: int) -> int:
    """A byte count from the environment, 0 included (off); 1e9 and 1073741824 both read."""
    raw = env_text(name)
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name} must be a number of bytes, got {raw!r}") from None
    if value < 0:
        raise ValueError(f"{name} must be 0 or more, got {raw}")
    return int(value)


@dataclass(frozen=True)
class WorkerSettings:
    """What one worker process needs besides the shared Settings (Redis, prefix, queue)."""

    model_cache_size: int = 2  # HYDRA_MODEL_CACHE_SIZE: models kept loaded per process
    model_cache_bytes: int | None = None  # HYDRA_MODEL_CACHE_BYTES: their parameter bytes at most (unset: no cap)
    # HYDRA_CLEAN_CACHE_BYTES: clean runs kept per loaded model for the next chunks (worker/engine/clean.py), on the
    # model's device; not counted in HYDRA_MODEL_CACHE_BYTES. 0 turns the cache off.
    clean_cache_bytes: int = DEFAULT_CLEAN_CACHE_BYTES
    device: str = "cpu"  # HYDRA_DEVICE
    dtype: str = "float32"  # HYDRA_DTYPE
    # A running chunk renews its lease every quarter of HYDRA_LEASE_S; a chunk whose lease lapsed is sent to
    # another worker by the next sweep (every HYDRA_SWEEP_S), so a vanished worker's chunk runs again within
    # lease + sweep (2.5 minutes by default). See service/core/leases.py and service/core/recovery.py.
    lease_s: float = 120.0
    sweep_s: float = 30.0
    # How long a chunk rides out a Redis outage before it gives up (worker/redis_retry.py). Below the lease, so
    # an outage the chunk survives never costs it its lease.
    redis_outage_s: float = 60.0
    # HYDRA_BATCH_TOKENS: a fixed budget per batch in rows × prompt tokens; None (unset): the engine derives it from
    # the device (worker/engine/memory.py).
    batch_tokens: int | None = None

    @property
    def renew_s(self) -> float:
        return self.lease_s / 4

    @property
    def recheck_s(self) -> float:
        """How long a chunk sent (or sent again) may wait unstarted before a sweep looks for its message."""
        return max(60.0, RECHECK_LEASES * self.lease_s)

    @classmethod
    def from_env(cls) -> WorkerSettings:
        defaults = cls()
        try:
            raw_bytes = env_text("HYDRA_MODEL_CACHE_BYTES")
            settings = cls(
                model_cache_size=env_int("HYDRA_MODEL_CACHE_SIZE", defaults.model_cache_size),
                model_cache_bytes=int(env_float("HYDRA_MODEL_CACHE_BYTES", 1.0)) if raw_bytes else None,
                clean_cache_bytes=_bytes_or_zero("HYDRA_CLEAN_CACHE_BYTES", defaults.clean_cache_bytes),
                device=env_text("HYDRA_DEVICE", defaults.device),
                dtype=env_text("HYDRA_DTYPE", defaults.dtype),
                lease_s=env_float("HYDRA_LEASE_S", defaults.lease_s),
                sweep_s=env_float("HYDRA_SWEEP_S", defaults.sweep_s),
                redis_outage_s=env_float("HYDRA_REDIS_OUTAGE_S", defaults.redis_outage_s),
                batch_tokens=env_int("HYDRA_BATCH_TOKENS", 1) if env_text("HYDRA_BATCH_TOKENS") else None,
            )
        except ValueError as error:
            raise WorkerConfigError(str(error)) from None
        settings.check()
        return settings

    def check(self) -> None:
        if self.dtype not in DTYPE_NAMES:
            raise WorkerConfigError(f"HYDRA_DTYPE must be one of {', '.join(DTYPE_NAMES)}, got {self.dtype!r}")
        if self.redis_outage_s >= self.lease_s:
            raise WorkerConfigError(
                f"HYDRA_REDIS_OUTAGE_S ({self.redis_outage_s:g}) must be below HYDRA_LEASE_S ({self.lease_s:g}): "
                "a chunk riding out a Redis outage must not lose its lease meanwhile"
            )
