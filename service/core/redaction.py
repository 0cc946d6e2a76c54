"""Credentials never reach a log line: `redis://user:secret@host` is logged as `redis://user:***@host`.

`redact` rewrites any URL's password in a text; `install_log_redaction` wraps the logging record factory of the
process, so every record (ours, Celery's, uvicorn's, any library's) has its message redacted once it is formatted,
whatever handler writes it. The API, the worker and the CLI install it at start-up.
"""

from __future__ import annotations

import logging
import re
from typing import Any

# scheme://[user]:password@ — the password ends at the last '@' before the host (passwords may contain '@').
_URL_PASSWORD = re.compile(r"(?P<head>\b[a-zA-Z][a-zA-Z0-9+.-]*://[^:/@\s]*:)(?P<secret>[^\s/]*)@(?=[^@\s/]*(?:[/\s]|$))")
MASK = "***"


def redact(text: str) -> str:
    """`text` with the password of every URL in it replaced by ***."""
    return _URL_PASSWORD.sub(lambda m: f"{m['head']}{MASK}@", text)


class _RedactedRecord(logging.LogRecord):
    def getMessage(self) -> str:
        return redact(super().getMessage())


def install_log_redaction() -> None:
    """Make every LogRecord of this process redact its message (idempotent)."""
    factory = logging.getLogRecordFactory()
    if getattr(factory, "redacts", False):
        return

    def make(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = factory(*args, **kwargs)
        record.__class__ = _RedactedRecord if type(record) is logging.LogRecord else record.__class__
        return record

    make.redacts = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(make)
