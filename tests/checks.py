"""Small typed helpers for tests."""

from __future__ import annotations

from typing import TypeVar

T = TypeVar("T")


def present(value: T | None) -> T:
    """`value`, asserted not None (a job, spec or fit the test has just made exists)."""
    assert value is not None
    return value
