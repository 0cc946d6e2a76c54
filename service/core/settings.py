"""Service settings, read once from the environment so the API and the worker agree on Redis keys and queues."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from service.core.configuration import variable

SEVEN_DAYS_S = 7 * 24 * 3600
MIB = 1024 * 1024

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def env_raw(name: str, environ: Mapping[str, str] | None = None) -> str | None:
    """The raw value of a registered variable (service/core/configuration.py), None when unset."""
    return (os.environ if environ is None else environ).get(variable(name).name)


def env_text(name: str, default: str = "", environ: Mapping[str, str] | None = None) -> str:
    """A text setting, stripped; unset or blank gives the default."""
    raw = env_raw(name, environ)
    return default if raw is None or raw.strip() == "" else raw.strip()


def env_int(name: str, default: int, minimum: int = 1, environ: Mapping[str, str] | None = None) -> int:
    """An integer setting from the environment; a bad value is a configuration error, never a silent default."""
    raw = env_raw(name, environ)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {raw!r}") from None
    if value < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {value}")
    return value


def env_float(name: str, default: float) -> float:
    """A positive number from the environment (seconds, say); a bad value is a configuration error."""
    raw = env_raw(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name} must be a number, got {raw!r}") from None
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {value}")
    return value


def env_bool(name: str, default: bool, environ: Mapping[str, str] | None = None) -> bool:
    """on/off, true/false, yes/no or 1/0; anything else is a configuration error, not a silent default."""
    raw = env_raw(name, environ)
    if raw is None or raw.strip() == "":
        return default
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"{name} must be on or off (1/0, true/false), got {raw!r}")


def _unset_default(raw: str | None, default: str) -> str:
    """Unset gives the default; set (even to "") is taken as it is (HYDRA_KEY_PREFIX= is an empty prefix)."""
    return default if raw is None else raw


@dataclass(frozen=True)
class Settings:
    """Where jobs live and how big they may be; frozen so one app never sees two configurations."""

    redis_url: str = "redis://127.0.0.1:6379/0"
    key_prefix: str = "hydra:"
    result_ttl_s: int = SEVEN_DAYS_S
    max_ablations: int = 5_000_000  # prompts × components × resample samples, per job
    # Numbers in a result (prompts × components × (2·layers + 6)): a stored result must stay well under Redis's
    # 512 MB value limit, at about 20 bytes a number in JSON.
    max_result_values: int = 25_000_000
    queue_name: str = "hydra"
    ready_timeout_s: float = 1.0  # how long /ready waits for a worker to answer a ping
    ready_cache_s: float = 2.0  # how long /ready reuses a worker ping's answer (one ping at a time, shared)
    # /health also pings Redis (503 when it does not answer). Off by default: an orchestrator restarting every API
    # process during a Redis outage helps nobody. The local stack turns it on: there Redis is a child of the same
    # `serve`, and a dead one means the stack is down.
    health_checks_redis: bool = False

    # Access control. Off only on purpose: the app refuses to start with auth off unless allow_no_auth is set too,
    # so a typo in a production environment cannot silently open every job to everyone.
    auth_enabled: bool = True
    allow_no_auth: bool = False
    api_keys: str = field(default="", repr=False)  # HYDRA_API_KEYS: "name:key[:admin],…", hashed at start-up

    # Limits per API key (0 switches a limit off). Counters live in Redis, so every API process shares them.
    rate_limit_write: int = 120  # POST and DELETE requests per key per window
    rate_limit_read: int = 1200  # GET requests on jobs per key per window (a client polling twice a second fits)
    rate_window_s: int = 60
    # Sign-in attempts on the web page per window, per client address and per the first characters of the key tried.
    ui_login_limit: int = 10
    max_active_jobs: int = 100  # queued + running jobs per key
    max_prompt_tokens: int = 512  # per prompt, counted with the model's published tokenizer
    max_body_bytes: int = 10 * MIB  # request bodies above this are refused with 413 before parsing
    # Bodies of at least this many bytes are decoded, checked and tokenised in worker threads, at most
    # `large_submits` at once per API process (busy: 503 with Retry-After); see service/api/large_bodies.py.
    large_submit_bytes: int = 256 * 1024
    large_submits: int = 1
    # Event streams and waiting long polls held open per API process (service/api/stream_slots.py): per key and in all.
    # The total stays well below a default 1024 open-file limit (each held request is a socket); 0 switches one off.
    max_streams_per_key: int = 32
    max_streams: int = 512

    # Webhooks (service/core/callbacks.py): networks a callback_url may resolve to although they are private or loopback
    # (comma-separated CIDRs, HYDRA_CALLBACK_ALLOW), and the delivery's retry schedule.
    callback_allow: str = ""
    callback_max_attempts: int = 6
    callback_backoff_s: float = 5.0  # the first retry's delay; each later one doubles it
    callback_timeout_s: float = 10.0

    # Chunks (service/core/chunk_book.py, service/core/queue.py): prompts per chunk when a job is planned, how often
    # one chunk may start before its job fails (its worker keeps dying), the hard time limit of one task, and the
    # broker's visibility timeout (None: derived from the time limit; always kept above it).
    chunk_prompts: int = 64
    max_deliveries: int = 3
    chunk_time_limit_s: float = 6 * 3600.0
    visibility_timeout_s: float | None = None

    access_log: bool = True  # HYDRA_ACCESS_LOG: one log line per HTTP request (service/api/observability.py)

    @classmethod
    def from_env(cls) -> Settings:
        """Settings from REDIS_URL and HYDRA_* variables; unset ones keep the defaults."""
        defaults = cls()
        return cls(
            redis_url=env_raw("REDIS_URL") or defaults.redis_url,
            key_prefix=_unset_default(env_raw("HYDRA_KEY_PREFIX"), defaults.key_prefix),
            result_ttl_s=env_int("HYDRA_RESULT_TTL_S", defaults.result_ttl_s),
            max_ablations=env_int("HYDRA_MAX_ABLATIONS", defaults.max_ablations),
            max_result_values=env_int("HYDRA_MAX_RESULT_VALUES", defaults.max_result_values),
            queue_name=env_raw("HYDRA_QUEUE") or defaults.queue_name,
            ready_timeout_s=env_float("HYDRA_READY_TIMEOUT_S", defaults.ready_timeout_s),
            ready_cache_s=env_float("HYDRA_READY_CACHE_S", defaults.ready_cache_s),
            health_checks_redis=env_bool("HYDRA_HEALTH_CHECKS_REDIS", defaults.health_checks_redis),
            auth_enabled=env_bool("HYDRA_AUTH", defaults.auth_enabled),
            allow_no_auth=env_bool("HYDRA_ALLOW_NO_AUTH", defaults.allow_no_auth),
            api_keys=_unset_default(env_raw("HYDRA_API_KEYS"), defaults.api_keys),
            rate_limit_write=env_int("HYDRA_RATE_LIMIT_WRITE", defaults.rate_limit_write, minimum=0),
            rate_limit_read=env_int("HYDRA_RATE_LIMIT_READ", defaults.rate_limit_read, minimum=0),
            rate_window_s=env_int("HYDRA_RATE_WINDOW_S", defaults.rate_window_s),
            ui_login_limit=env_int("HYDRA_UI_LOGIN_LIMIT", defaults.ui_login_limit, minimum=0),
            max_active_jobs=env_int("HYDRA_MAX_ACTIVE_JOBS", defaults.max_active_jobs, minimum=0),
            max_prompt_tokens=env_int("HYDRA_MAX_PROMPT_TOKENS", defaults.max_prompt_tokens, minimum=0),
            max_body_bytes=env_int("HYDRA_MAX_BODY_BYTES", defaults.max_body_bytes),
            large_submit_bytes=env_int("HYDRA_LARGE_SUBMIT_BYTES", defaults.large_submit_bytes, minimum=0),
            large_submits=env_int("HYDRA_LARGE_SUBMITS", defaults.large_submits),
            max_streams_per_key=env_int("HYDRA_MAX_STREAMS_PER_KEY", defaults.max_streams_per_key, minimum=0),
            max_streams=env_int("HYDRA_MAX_STREAMS", defaults.max_streams, minimum=0),
            callback_allow=_unset_default(env_raw("HYDRA_CALLBACK_ALLOW"), defaults.callback_allow),
            callback_max_attempts=env_int("HYDRA_CALLBACK_MAX_ATTEMPTS", defaults.callback_max_attempts),
            callback_backoff_s=env_float("HYDRA_CALLBACK_BACKOFF_S", defaults.callback_backoff_s),
            callback_timeout_s=env_float("HYDRA_CALLBACK_TIMEOUT_S", defaults.callback_timeout_s),
            chunk_prompts=env_int("HYDRA_CHUNK_PROMPTS", defaults.chunk_prompts),
            max_deliveries=env_int("HYDRA_MAX_DELIVERIES", defaults.max_deliveries),
            chunk_time_limit_s=env_float("HYDRA_CHUNK_TIME_LIMIT_S", defaults.chunk_time_limit_s),
            visibility_timeout_s=(
                env_float("HYDRA_VISIBILITY_TIMEOUT_S", 1.0) if env_text("HYDRA_VISIBILITY_TIMEOUT_S") else None
            ),
            access_log=env_bool("HYDRA_ACCESS_LOG", defaults.access_log),
        )
