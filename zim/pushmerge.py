"""Merged channel pushes (action 103): one packet per member connection per time slice.

With ``App.run(push_window_ms=W, push_max=N)`` a channel message push (102) is
not sent at once. The first one after a quiet period opens a *slice* of the
channel that closes W ms later; every channel message pushed meanwhile joins it.
When the slice closes, its newest N messages go out as one 103 packet
``{"channel", "messages", "skipped"}``, ``skipped`` counting the older ones left
out (clients read them from history by seq). The first message of a slice is
held for the whole window too: latency grows by at most W, and a burst costs one
packet per member however long it is.

Cost: per open slice, at most N encoded messages plus counters, nothing per
member. The 103 body is built once per slice and fanned out in C to every member
connection except the ones that sent in the slice; each of those gets its own
body without its own messages (nothing if the slice held only its own), as a
connection never gets its own messages pushed back (as with 102).

Slices end on a reactor timer (``Reactor.timer``): no thread, and one timer per
process, set to the oldest open slice's deadline. As every slice lasts the same
W, deadlines come in the order slices open (a FIFO).
"""
from __future__ import annotations

import logging
import time
from collections import deque
from typing import Any, Mapping, Protocol

import orjson

from zim._core import Reactor, Timer
from zim.protocol import PUSH_CHANNEL_BATCH      # what channel messages are merged into

log = logging.getLogger("zim.pushmerge")

DEFAULT_PUSH_MAX = 20
MAX_PUSH_WINDOW_MS = 60_000
MAX_PUSH_MAX = 1000
# Server packets stay under 1 MiB (docs/protocol.md): older messages beyond this go to
# ``skipped`` even below push-max (a slice always keeps its newest message).
BATCH_BUDGET = 1_000_000
_BATCH_OVERHEAD = 64            # keys, brackets and the skipped count around the messages


def check_push_settings(push_window_ms: int, push_max: int) -> None:
    """Raise ValueError, with a message for the user, for settings out of range."""
    for name, value in (("push_window_ms", push_window_ms), ("push_max", push_max)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name} must be an integer, not {value!r}")
    if not 0 <= push_window_ms <= MAX_PUSH_WINDOW_MS:
        raise ValueError(f"push_window_ms must be between 0 (off) and {MAX_PUSH_WINDOW_MS}")
    if not 1 <= push_max <= MAX_PUSH_MAX:
        raise ValueError(f"push_max must be between 1 and {MAX_PUSH_MAX}")


# ---------------------------------------------------------------- slices


class Slice:
    """A channel's open slice: its newest messages (encoded) and counters."""

    __slots__ = ("channel", "deadline", "kept", "kept_bytes", "total", "senders")

    def __init__(self, channel: str, deadline: int) -> None:
        self.channel = channel
        self.deadline = deadline            # time.monotonic_ns()
        self.kept: deque[tuple[int, bytes]] = deque()   # (sending connection, message), oldest first
        self.kept_bytes = 0
        self.total = 0                      # messages pushed in the slice, kept or not
        self.senders: dict[int, int] = {}   # sending connection -> its messages in the slice

    def add(self, sender: int, message: bytes, push_max: int, budget: int) -> None:
        kept = self.kept
        kept.append((sender, message))
        self.kept_bytes += len(message) + 1
        self.total += 1
        if sender:
            self.senders[sender] = self.senders.get(sender, 0) + 1
        while len(kept) > push_max or (self.kept_bytes > budget and len(kept) > 1):
            self.kept_bytes -= len(kept.popleft()[1]) + 1

    def bodies(self) -> tuple[bytes, dict[int, bytes | None]]:
        """The 103 body for the members, and each sending connection's own (None: nothing)."""
        head = b'{"channel":' + orjson.dumps(self.channel) + b',"messages":['
        messages = [message for _, message in self.kept]
        shared = batch_body(head, messages, self.total - len(messages))
        own: dict[int, bytes | None] = {}
        for conn, sent in self.senders.items():
            others = [message for sender, message in self.kept if sender != conn]
            skipped = self.total - sent - len(others)
            own[conn] = batch_body(head, others, skipped) if others or skipped else None
        return shared, own


def batch_body(head: bytes, messages: list[bytes], skipped: int) -> bytes:
    return b"".join((head, b",".join(messages), b'],"skipped":', str(skipped).encode(), b"}"))


class Channels(Protocol):
    """What the merger needs of the server (``zim.server.Server``): each channel's
    group id, and the fabric that broadcasts to a group."""

    groups: Mapping[str, int]
    fabric: Any


class PushMerger:
    """Holds channel message pushes in per-channel slices and sends each slice as
    one 103 when it ends (see the module docstring)."""

    def __init__(self, channels: Channels, push_window_ms: int, push_max: int) -> None:
        check_push_settings(push_window_ms, push_max)
        self.channels = channels
        self.window_ns = push_window_ms * 1_000_000
        self.push_max = push_max
        self.slices: dict[str, Slice] = {}      # channel -> its open slice
        self.by_deadline: deque[Slice] = deque()
        self.timer: Timer | None = None

    def start(self, reactor: Reactor) -> None:
        """Run the slices' timer on ``reactor`` (the process that runs the handlers)."""
        self.timer = reactor.timer(self._on_timer)

    def add(self, channel: str, sender: int, message: bytes) -> None:
        """Add an encoded channel message to the channel's slice (opening one if
        none is open); ``sender`` is the connection that sent it (0: none)."""
        open_slice = self.slices.get(channel)
        if open_slice is None:
            open_slice = self.slices[channel] = Slice(channel, time.monotonic_ns() + self.window_ns)
            self.by_deadline.append(open_slice)
            if len(self.by_deadline) == 1:
                self.timer.set(open_slice.deadline)
        budget = BATCH_BUDGET - _BATCH_OVERHEAD - 6 * len(channel)
        open_slice.add(sender, message, self.push_max, budget)

    def _on_timer(self) -> None:
        now = time.monotonic_ns()
        by_deadline = self.by_deadline
        try:
            while by_deadline and by_deadline[0].deadline <= now:
                self._send(by_deadline.popleft())
        finally:
            if by_deadline:
                self.timer.set(by_deadline[0].deadline)

    def _send(self, ended: Slice) -> None:
        del self.slices[ended.channel]
        group = self.channels.groups.get(ended.channel)
        if group is None:
            return
        shared, own = ended.bodies()
        try:
            self.channels.fabric.broadcast_except(group, PUSH_CHANNEL_BATCH, shared, own)
        except Exception:       # one slice's failure must not stop the others
            log.exception("sending the merged pushes of %r failed", ended.channel)

    def close(self) -> None:
        """Send the open slices now (the server is stopping) and drop the timer."""
        while self.by_deadline:
            self._send(self.by_deadline.popleft())
        if self.timer is not None:
            self.timer.close()
            self.timer = None
