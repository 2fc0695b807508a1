"""Send rate limits: a token bucket per user and per channel (the drop strategy).

A bucket of rate ``r`` gains ``r`` tokens a second and holds at most ``burst``
tokens: one second's worth (``r``, at least 1). A send takes a token; a send
that finds no token is refused (``rate_limited``) and not stored.

A bucket is kept as one number, the time at which it will be full again (the
generic cell rate algorithm: the same decisions as a token count plus a
timestamp). A full bucket needs no state, so an entry exists only while its
bucket is not full: at most about a second after its key's last send. The
table is rebuilt without those entries once a second (``purge``), so its
memory follows the keys that sent in the last second or so, not every user
or channel there is.
"""
from __future__ import annotations

import math
import time
from typing import Callable, Hashable

MAX_RATE = 1_000_000.0      # messages per second: above this a limit means nothing
# Float sums of intervals (40 x 0.025 ...) land a hair above their exact value;
# without this slack the burst's last token could be refused.
_ROUNDING_SLACK = 1e-9


def check_rate(name: str, value: object) -> float:
    """``value`` as a rate in messages per second (0: off), else ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number of messages per second, not {value!r}")
    rate = float(value)
    if not (math.isfinite(rate) and 0 <= rate <= MAX_RATE):
        raise ValueError(f"{name} must be between 0 (off) and {MAX_RATE:,.0f} messages per second, "
                         f"not {value!r}")
    return rate


class TokenBuckets:
    """One token bucket per key, ``rate`` tokens a second, burst one second's worth."""

    __slots__ = ("rate", "burst", "interval", "_tolerance", "_full_at")

    def __init__(self, rate: float) -> None:
        if not 0 < rate <= MAX_RATE:
            raise ValueError(f"rate must be in (0, {MAX_RATE:g}]")
        self.rate = rate
        self.burst = max(1.0, rate)
        self.interval = 1.0 / rate          # seconds one token takes to come back
        # a send is allowed while the bucket holds a whole token, i.e. while it is
        # full again within (burst - 1) tokens' time
        self._tolerance = (self.burst - 1.0) * self.interval + _ROUNDING_SLACK
        self._full_at: dict[Hashable, float] = {}

    def __len__(self) -> int:
        """Buckets that are not full (the only ones stored)."""
        return len(self._full_at)

    def has_token(self, key: Hashable, now: float) -> bool:
        return self._full_at.get(key, now) - now <= self._tolerance

    def take(self, key: Hashable, now: float) -> None:
        """Take a token (after ``has_token`` said there is one)."""
        full_at = self._full_at.get(key, now)
        self._full_at[key] = (full_at if full_at > now else now) + self.interval

    def purge(self, now: float) -> None:
        """Forget the buckets that are full by ``now``; a new table, so its memory shrinks too."""
        self._full_at = {key: full_at for key, full_at in self._full_at.items() if full_at > now}


class SendLimits:
    """The server's send limits: per user (actions 2 and 4) and per channel (action 4).

    A rate of 0 turns that limit off.
    """

    __slots__ = ("user_rate", "channel_rate", "users", "channels", "clock", "refused")

    def __init__(self, user_rate: float = 0, channel_rate: float = 0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.user_rate = check_rate("user_rate", user_rate)
        self.channel_rate = check_rate("channel_rate", channel_rate)
        self.users = TokenBuckets(self.user_rate) if self.user_rate else None
        self.channels = TokenBuckets(self.channel_rate) if self.channel_rate else None
        self.clock = clock
        self.refused = {"user": 0, "channel": 0}    # sends refused, by the bucket that refused them

    def refusal(self, user: str, channel: str | None = None) -> str | None:
        """Why a send by ``user`` (to ``channel``, for a channel message) is refused,
        or None: then it has taken its tokens. A refused send takes none."""
        users, channels = self.users, self.channels
        if users is None and (channels is None or channel is None):
            return None
        now = self.clock()
        if users is not None and not users.has_token(user, now):
            self.refused["user"] += 1
            return f"at most {self.user_rate:g} messages per second per user"
        if channels is not None and channel is not None:
            if not channels.has_token(channel, now):
                self.refused["channel"] += 1
                return f"at most {self.channel_rate:g} messages per second in channel {channel}"
            channels.take(channel, now)
        if users is not None:
            users.take(user, now)
        return None

    def purge(self) -> None:
        """Drop the buckets that have refilled (call about once a second)."""
        now = self.clock()
        for buckets in (self.users, self.channels):
            if buckets is not None:
                buckets.purge(now)
