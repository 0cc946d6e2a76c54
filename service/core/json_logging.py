"""JSON logs and the context every log line names (request id, job id), for the API and the worker alike.

`HYDRA_LOG_FORMAT=json`: one JSON object per log line with time, level, logger, message, request_id and job_id.
The API's middleware (service/api/observability.py) sets the request id; the worker's task hooks set the job id.
"""

from __future__ import annotations

import contextvars
import json
import logging
import time
from typing import Any

from service.core.settings import env_text

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("hydra_request_id", default=None)
job_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("hydra_job_id", default=None)


class ContextFilter(logging.Filter):
    """Puts the current request id and job id on every record (None outside a request or task)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = request_id_var.get()
        if not hasattr(record, "job_id") or record.job_id is None:
            record.job_id = job_id_var.get()
        return True


_STANDARD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, request_id, job_id, extras, exception."""

    def format(self, record: logging.LogRecord) -> str:
        document: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", None),
            "job_id": getattr(record, "job_id", None),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and key not in document:
                document[key] = value if isinstance(value, (str, int, float, bool, type(None))) else repr(value)
        if record.exc_info:
            document["exception"] = self.formatException(record.exc_info)
        return json.dumps(document, ensure_ascii=False)


def json_logs_requested() -> bool:
    value = env_text("HYDRA_LOG_FORMAT", "text").lower()
    if value not in ("text", "json"):
        raise ValueError(f"HYDRA_LOG_FORMAT must be text or json, got {value!r}")
    return value == "json"


def configure_json_logging(level: int = logging.INFO) -> None:
    """Route every logger through one JSON handler on stderr (called when HYDRA_LOG_FORMAT=json)."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    handler.addFilter(ContextFilter())
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(level)
    for name in ("litestar", "uvicorn", "uvicorn.access", "uvicorn.error", "celery", "hydra.access"):
        logger = logging.getLogger(name)
        logger.handlers = []
        logger.propagate = True
