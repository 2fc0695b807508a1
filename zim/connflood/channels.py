"""Which channels each of connflood's users joins (``--channels-per-user``).

Every user joins one channel in each of N *slots*. Slot k has channels of one
size, the sizes spread evenly on a log scale from MIN to MAX members
(``--channel-sizes``), so users sit in channels of mixed sizes as in real IM.
In slot k the users are shuffled by a fixed bijection of 0..U-1 (multiply by a
number coprime with U, then add an offset) and cut into runs of the slot's size:
every channel of the slot has exactly that many members (the last one may have
fewer), and a user's N channels are distinct. Every client process works the
plan out alone from (U, N, MIN, MAX): the same user always gets the same
channels, and no process needs to hear from another.
"""
from __future__ import annotations

import math

# odd multipliers of the slots' shuffles; each is made coprime with U at use
MULTIPLIERS = (1_000_003, 999_983, 1_299_709, 15_485_863, 32_452_843, 49_979_687, 67_867_967, 86_028_121)


def _coprime(multiplier: int, users: int) -> int:
    while math.gcd(multiplier, users) != 1:
        multiplier += 2
    return multiplier


class ChannelPlan:
    """The channels of ``users`` users (numbered 0..users-1), ``per_user`` each."""

    def __init__(self, users: int, per_user: int, smallest: int, largest: int) -> None:
        self.users = users
        self.per_user = per_user
        self.sizes = [max(1, min(users, round(smallest * (largest / smallest) ** (k / max(1, per_user - 1)))))
                      for k in range(per_user)]
        self.shuffles = [(_coprime(MULTIPLIERS[k % len(MULTIPLIERS)] + 2 * (k // len(MULTIPLIERS)), users),
                          (k * 7919) % users) for k in range(per_user)]

    def names(self, user: int) -> list[str]:
        """The channels user number ``user`` joins, one per slot."""
        return [f"c{k}-{((user * multiplier + offset) % self.users) // size}"
                for k, (size, (multiplier, offset)) in enumerate(zip(self.sizes, self.shuffles))]

    def largest(self) -> str:
        """A channel of the largest size."""
        k = max(range(self.per_user), key=self.sizes.__getitem__)
        return f"c{k}-0"

    def summary(self) -> dict:
        """How many channels and memberships the plan makes, by size."""
        channels = sum(-(-self.users // size) for size in self.sizes)
        return {"channels_per_user": self.per_user, "channels": channels,
                "memberships": self.users * self.per_user, "sizes": self.sizes}
