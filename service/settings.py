"""Service settings, read once from the environment so the API and the worker agree on Redis keys and queues."""

from __future__ import annotations

import os
from dataclasses import dataclass

SEVEN_DAYS_S = 7 * 24 * 3600


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {raw!r}") from None
    if value < 1:
        raise ValueError(f"{name} must be at least 1, got {value}")
    return value


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name} must be a number, got {raw!r}") from None
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {value}")
    return value


@dataclass(frozen=True)
class Settings:
    """Where jobs live and how big they may be; frozen so one app never sees two configurations."""

    redis_url: str = "redis://127.0.0.1:6379/0"
    key_prefix: str = "hydra:"
    result_ttl_s: int = SEVEN_DAYS_S
    max_ablations: int = 5_000_000  # prompts × components × resample samples, per job
    queue_name: str = "hydra"
    ready_timeout_s: float = 1.0  # how long /ready waits for a worker to answer a ping

    @classmethod
    def from_env(cls) -> Settings:
        """Settings from REDIS_URL and HYDRA_* variables; unset ones keep the defaults."""
        defaults = cls()
        return cls(
            redis_url=os.environ.get("REDIS_URL") or defaults.redis_url,
            key_prefix=os.environ.get("HYDRA_KEY_PREFIX", defaults.key_prefix),
            result_ttl_s=_env_int("HYDRA_RESULT_TTL_S", defaults.result_ttl_s),
            max_ablations=_env_int("HYDRA_MAX_ABLATIONS", defaults.max_ablations),
            queue_name=os.environ.get("HYDRA_QUEUE") or defaults.queue_name,
            ready_timeout_s=_env_float("HYDRA_READY_TIMEOUT_S", defaults.ready_timeout_s),
        )
