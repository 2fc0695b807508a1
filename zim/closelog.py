"""The log of the connections a server closes, by reason, in aggregate.

A million clients can be closed in a minute (a network blip, a restart of a load
balancer): one line per close would drown the log. Instead each reason gets at most
one line per interval, with the count since its last line and the total; the first
close of a reason is logged at the next tick, so a lone one is seen at once.
Connections the peer closed are not the server's doing and are not logged.
"""
from __future__ import annotations

import logging
import time
from typing import Callable

log = logging.getLogger("zim.closes")

LOG_INTERVAL_SECONDS = 10.0

WHY = {
    "login_timeout": "not logged in within --login-timeout",
    "idle_timeout": "silent for --idle-timeout",
    "too_large": "sent a packet over --max-packet",
    "protocol_error": "broke the framing or the WebSocket protocol",
    "output_cap": "stopped reading: output queue over --max-outbuf",
    "memory_budget": "the largest output queues while the worker's passed --max-client-memory",
    "origin": "a WebSocket Origin not in --ws-origins",
    "address_limit": "refused: its address had --max-conns-per-address connections",
    "fd_limit": "refused at the open-file limit",
    "shutdown": "the server is stopping",
    "server": "closed by the server (an application's close, a worker link)",
    "no_memory": "out of memory for its buffers",
}


class CloseLog:
    """Call once a second with the reactor's counters (``Reactor.counters_dict``)."""

    def __init__(self, name: str, clock: Callable[[], float] = time.monotonic,
                 interval: float = LOG_INTERVAL_SECONDS) -> None:
        self.name = name
        self.clock = clock
        self.interval = interval
        self.logged: dict[str, int] = {}        # reason -> total at its last line
        self.last_line: dict[str, float] = {}   # reason -> when its last line was written

    def __call__(self, counters: dict[str, int], final: bool = False) -> None:
        """Log each reason whose count moved, at most once per interval (``final``: now)."""
        now = self.clock()
        for reason, why in WHY.items():
            total = counters.get(f"closed_{reason}", 0)
            new = total - self.logged.get(reason, 0)
            if new <= 0:
                continue
            last = self.last_line.get(reason)
            if not final and last is not None and now - last < self.interval:
                continue
            since = "" if last is None else f" in the last {now - last:.0f} s"
            log.warning("%s: %d connections closed (%s: %s)%s, %d in all",
                        self.name, new, reason, why, since, total)
            self.logged[reason] = total
            self.last_line[reason] = now
