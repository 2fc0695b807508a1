"""How long a link waits before reconnecting: doubling delays, capped, jittered.

Shared by the links that reconnect by themselves (zim.nodes.link to Redis,
zim.archive.link to PostgreSQL).
"""
from __future__ import annotations

FIRST_BACKOFF = 0.05        # seconds before the first reconnect
MAX_BACKOFF = 2.0           # the cap: a restarted server is found within this much
# Each delay is shortened by up to this fraction, at random: the links of many
# nodes that lost a restarted server together do not all come back in the same instant.
BACKOFF_JITTER = 0.25


def backoff_delay(failures: int, first: float = FIRST_BACKOFF, cap: float = MAX_BACKOFF) -> float:
    """Seconds to wait before reconnecting after ``failures`` failed attempts in a
    row (1 or more): ``first`` doubled at each further failure, at most ``cap``."""
    if failures < 1:
        raise ValueError("failures counts from 1")
    # min() on the exponent first: 2.0 ** 10_000 would overflow
    return min(cap, first * 2.0 ** min(failures - 1, 64))


def jittered(delay: float, draw: float) -> float:
    """``delay`` shortened by ``draw`` (0 <= draw < 1) times BACKOFF_JITTER of itself."""
    return delay * (1.0 - BACKOFF_JITTER * draw)
