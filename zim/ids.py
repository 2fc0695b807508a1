"""Snowflake ids: 64-bit, time-ordered, unique per worker.

Layout (most significant first), 63 bits used so an id also fits a signed
64-bit column::

    41 bits  milliseconds since EPOCH_MS (2024-01-01 UTC), good for ~69 years
    10 bits  worker / node id (0..1023)
    12 bits  sequence within the millisecond (0..4095)

Sorting ids sorts them by creation time (ties broken by worker, then sequence).
"""
from __future__ import annotations

import time
from typing import Callable

EPOCH_MS = 1_704_067_200_000  # 2024-01-01T00:00:00Z in Unix milliseconds

TIME_BITS = 41
WORKER_BITS = 10
SEQUENCE_BITS = 12

MAX_WORKER = (1 << WORKER_BITS) - 1
MAX_SEQUENCE = (1 << SEQUENCE_BITS) - 1
MAX_TIME = (1 << TIME_BITS) - 1
TIME_SHIFT = WORKER_BITS + SEQUENCE_BITS


def wall_clock_ms() -> int:
    """Unix time in milliseconds."""
    return time.time_ns() // 1_000_000


def timestamp_ms(snowflake: int) -> int:
    """The Unix millisecond an id was made in."""
    return (snowflake >> TIME_SHIFT) + EPOCH_MS


class Snowflake:
    """Makes strictly increasing ids for one worker.

    ``clock`` returns Unix milliseconds (injectable for tests). The generator never
    goes backwards: if the wall clock steps back it keeps counting from the last
    millisecond it used, and when the 4096 ids of one millisecond run out it borrows
    the next millisecond instead of sleeping (so ids may run slightly ahead of the
    clock under a burst, and catch up when it eases). Not thread-safe: one reactor
    thread calls it.
    """

    __slots__ = ("worker_id", "_clock", "_last_ms", "_sequence")

    def __init__(self, worker_id: int = 0, clock: Callable[[], int] | None = None) -> None:
        if not isinstance(worker_id, int) or not 0 <= worker_id <= MAX_WORKER:
            raise ValueError(f"worker_id must be an integer in 0..{MAX_WORKER}")
        self.worker_id = worker_id
        self._clock = clock or wall_clock_ms
        self._last_ms = -1  # ms since EPOCH_MS of the last id made
        self._sequence = 0

    def next(self) -> int:
        """A new id, greater than every id this generator made (or was told of) before."""
        now = max(self._clock() - EPOCH_MS, 0)  # a clock before the epoch counts as the epoch
        if now > self._last_ms:
            self._last_ms = now
            self._sequence = 0
        else:
            # same millisecond, or the clock stepped back: continue from last_ms
            self._sequence += 1
            if self._sequence > MAX_SEQUENCE:
                self._last_ms += 1
                self._sequence = 0
        if self._last_ms > MAX_TIME:
            raise RuntimeError("snowflake time bits exhausted (clock past 2093?)")
        snowflake = (self._last_ms << TIME_SHIFT) | (self.worker_id << SEQUENCE_BITS) | self._sequence
        if snowflake == 0:
            # 0 means "no user" to the reactor; only possible exactly at the epoch
            return self.next()
        return snowflake

    def advance_past(self, snowflake: int) -> None:
        """Make every later id greater than ``snowflake`` (e.g. the newest id in a store
        after a restart, in case the clock is now behind it)."""
        ms = snowflake >> TIME_SHIFT
        if ms >= self._last_ms:
            # a full sequence: the next id within this ms moves on to ms + 1
            self._last_ms = ms
            self._sequence = MAX_SEQUENCE
