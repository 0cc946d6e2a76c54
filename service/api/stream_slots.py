"""Caps on the requests an API process holds open: event streams and long polls, per API key and in total.

A held request costs no Redis connection while it waits (service/core/event_hub.py), but it still costs a socket, a
file descriptor, a task and a share of the reads each change triggers; without a cap, one key could open enough
of them to crowd out every other key's. The caps are counted in the process, not in Redis: what they protect
(descriptors, memory, the event loop) belongs to the process, a count in memory cannot outlive a crashed process,
and taking a slot needs no write (it works while Redis is full or away). With P API processes behind one address
a key can hold up to P × the per-key cap, each process's share bounded.

Everything here runs on the event loop, so plain counters need no lock.
"""

from __future__ import annotations

from dataclasses import dataclass

RETRY_AFTER_S = 5  # a 429's Retry-After: a long poll frees its slot within a minute, a stream when its job ends


class TooManyStreams(Exception):
    """A stream or long poll refused: the key (`owner`) or the whole process already holds its cap."""

    def __init__(self, owner: str, held: int, cap: int, per_key: bool) -> None:
        super().__init__(owner, held, cap, per_key)
        self.owner = owner
        self.held = held
        self.cap = cap
        self.per_key = per_key
        self.retry_after_s = RETRY_AFTER_S


@dataclass
class Slot:
    """One held request's place; `release` is idempotent (called by whichever cleanup runs first)."""

    slots: StreamSlots
    owner: str
    released: bool = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.slots._release(self.owner)


class StreamSlots:
    """Open event streams and waiting long polls of one API process, counted per key and in total."""

    def __init__(self, per_key: int, total: int) -> None:
        self.per_key = per_key  # 0: no per-key cap
        self.total = total  # 0: no total cap
        self._held: dict[str, int] = {}
        self.held_total = 0

    def held(self, owner: str) -> int:
        return self._held.get(owner, 0)

    def acquire(self, owner: str) -> Slot:
        """A slot for `owner`, or TooManyStreams when its cap or the process's is reached."""
        mine = self.held(owner)
        if self.per_key and mine >= self.per_key:
            raise TooManyStreams(owner, mine, self.per_key, per_key=True)
        if self.total and self.held_total >= self.total:
            raise TooManyStreams(owner, self.held_total, self.total, per_key=False)
        self._held[owner] = mine + 1
        self.held_total += 1
        return Slot(self, owner)

    def _release(self, owner: str) -> None:
        left = self._held.get(owner, 0) - 1
        if left > 0:
            self._held[owner] = left
        else:
            self._held.pop(owner, None)
        self.held_total -= 1
