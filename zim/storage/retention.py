"""Retention tiers: how long and how many messages each kind of conversation keeps.

The design article's tiers: private conversations keep the most, small channels a
medium amount, large channels little (their history is mostly read live). Each tier
is a TTL and a per-conversation cap; 0 turns either off. A background task in the
writer process prunes what falls outside them, a bounded chunk at a time, so sends
are never stalled by it. A direct message still in its receiver's mailbox (not yet
acked) is never pruned: it is kept until acked.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass

DAY_MS = 86_400_000
_UNITS_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": DAY_MS}
_DURATION = re.compile(r"(\d+)(ms|s|m|h|d)?")
MAX_TTL_MS = 100 * 365 * DAY_MS
MAX_CAP = 1 << 40


@dataclass(frozen=True)
class Tier:
    """Keep messages younger than ``ttl_ms`` and at most ``cap`` per conversation (0: no limit)."""

    ttl_ms: int
    cap: int

    def __str__(self) -> str:
        return f"{format_duration(self.ttl_ms)}:{self.cap}"


@dataclass(frozen=True)
class Retention:
    """The three tiers; a channel with ``large_members`` members or more is large."""

    private: Tier = Tier(365 * DAY_MS, 100_000)
    channel: Tier = Tier(90 * DAY_MS, 10_000)
    large: Tier = Tier(7 * DAY_MS, 1_000)
    large_members: int = 1_000
    prune_every_s: int = 60

    def tier(self, is_channel: bool, members: int) -> Tier:
        if not is_channel:
            return self.private
        return self.large if members >= self.large_members else self.channel

    def as_dict(self) -> dict:
        """This policy as plain values (for the writer process: no second parser)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "Retention":
        """The policy ``as_dict`` gave."""
        return cls(Tier(**values["private"]), Tier(**values["channel"]), Tier(**values["large"]),
                   values["large_members"], values["prune_every_s"])


def parse_duration(text: str) -> int:
    """``"90"`` (seconds), ``"90s"``, ``"15m"``, ``"12h"``, ``"30d"``, ``"500ms"`` -> milliseconds."""
    match = _DURATION.fullmatch(text.strip())
    if not match:
        raise ValueError(f"{text!r} is not a duration (like 30d, 12h, 15m, 90s or 0)")
    value = int(match.group(1)) * _UNITS_MS[match.group(2) or "s"]
    if value > MAX_TTL_MS:
        raise ValueError(f"{text!r} is longer than 100 years")
    return value


def format_duration(ms: int) -> str:
    for unit in ("d", "h", "m", "s"):
        if ms and ms % _UNITS_MS[unit] == 0:
            return f"{ms // _UNITS_MS[unit]}{unit}"
    return f"{ms}ms" if ms else "0"


def parse_tier(text: str) -> Tier:
    """``"TTL:CAP"``, e.g. ``"30d:10000"``; ``"0:0"`` keeps everything."""
    ttl, sep, cap = text.partition(":")
    if not sep or not cap.strip().isdigit():
        raise ValueError(f"{text!r} is not TTL:CAP (like 30d:10000; 0 turns either off)")
    count = int(cap)
    if count > MAX_CAP:
        raise ValueError(f"cap {count} is too large")
    return Tier(parse_duration(ttl), count)
