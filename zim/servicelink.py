"""A connection to a service (Redis, PostgreSQL) served by the reactor that
reconnects by itself: what the links of zim.nodes.link and zim.archive.link
share.

- **States.** ``state`` is ``"connecting"``, ``"up"``, ``"down"`` (waiting to
  reconnect) or ``"closed"``; ``on_state(state)``, if given, learns every change
  to ``"up"`` or ``"down"``. ``failures`` counts the attempts that failed since
  the link was last up, ``connections`` the connections made, ``last_error``
  why it last went down.
- **One descriptor in the reactor**: an epoll set of the link's own, holding its
  socket; the reactor calls ``_on_ready`` when the set is readable.
- **Reconnects** after ``backoff_delay(failures)`` seconds, jittered (zim.backoff).
- **The stall check**: a connect that does not finish, or answers due that do not
  come, for ``reply_timeout`` seconds make the link lost. Checked four times per
  timeout on one reactor timer, which also brings the next attempt.

A link sets its own fields, then calls ``ServiceLink.__init__`` (which starts
connecting), and gives: ``_connect`` (open the connection: ``_start_connecting()``
first, ``_arm_stall_check()`` once the attempt is under way, ``_lost(reason)`` if
it fails), ``_drop_connection``, ``_fail_waiting(reason)``, ``waiting``, and
``_awaiting_answers()``; it counts every answer read in ``_answers`` and calls
``_became_up()`` when the connection is ready.
"""
from __future__ import annotations

import logging
import random
import select
import time
from typing import Callable

from zim._core import Reactor, Timer
from zim.backoff import FIRST_BACKOFF, MAX_BACKOFF, backoff_delay, jittered

DOWN, CONNECTING, UP, CLOSED = "down", "connecting", "up", "closed"


class ServiceLink:
    """See the module docstring. ``kind`` names the service in failure reasons
    ("redis link lost: ..."), ``label`` in the log, ``waiting_noun`` what waits."""

    kind = "service"
    waiting_noun = "calls"
    log = logging.getLogger("zim")

    def __init__(self, reactor: Reactor, *, reply_timeout: float, first_backoff: float = FIRST_BACKOFF,
                 max_backoff: float = MAX_BACKOFF, on_state: Callable[[str], None] | None = None) -> None:
        self.reactor = reactor
        self.reply_timeout = reply_timeout
        self.first_backoff = first_backoff
        self.max_backoff = max_backoff
        self.on_state = on_state
        self.state = DOWN
        self.failures = 0               # failed attempts since the link was last up
        self.connections = 0            # connections made so far (1 + reconnects)
        self.last_error = ""            # why the link last went down
        self._answers = 0               # answers read so far (the stall check's progress)
        self._answers_at_check = 0
        self._stalled_for = 0.0
        self._poller = select.epoll()
        self._alarm: Timer | None = None
        try:
            reactor.watch(self._poller.fileno(), self._on_ready)
            self._alarm = reactor.timer(self._on_alarm)
        except BaseException:
            self.close()
            raise
        self._connect()

    @property
    def label(self) -> str:
        return self.kind

    @property
    def waiting(self) -> int:
        raise NotImplementedError

    def close(self) -> None:
        """Drop the connection for good: what waits fails, later calls fail at once."""
        if self.state is CLOSED:
            return
        self._drop_connection()
        self.state = CLOSED
        self.last_error = "closed"
        if self._alarm is not None:
            self._alarm.close()
        self.reactor.unwatch(self._poller.fileno())
        self._poller.close()
        self._fail_waiting(f"{self.kind} link closed")

    # -- what a link gives ---------------------------------------------------------
    def _connect(self) -> None:
        raise NotImplementedError

    def _drop_connection(self) -> None:
        raise NotImplementedError

    def _fail_waiting(self, reason: str) -> None:
        raise NotImplementedError

    def _awaiting_answers(self) -> bool:
        raise NotImplementedError

    def _on_ready(self) -> None:
        raise NotImplementedError

    # -- the life of a connection ---------------------------------------------------
    def _start_connecting(self) -> None:
        self.state = CONNECTING
        self._stalled_for = 0.0

    def _became_up(self) -> None:
        """The connection is ready (the link then tells ``on_state`` when it sees fit)."""
        self.state = UP
        self.connections += 1
        if self.failures:
            self.log.info("%s reachable again after %d failed attempts", self.label, self.failures)
        self.failures = 0

    def _lost(self, reason: str) -> None:
        """The connection is unusable: fail what waits on it, retry later."""
        was_up = self.state is UP
        self._drop_connection()
        self.state = DOWN
        self.last_error = reason
        self.failures += 1
        delay = jittered(backoff_delay(self.failures, self.first_backoff, self.max_backoff), random.random())
        if was_up or self.failures == 1:
            self.log.warning("%s: %s; %d %s fail; reconnecting", self.label, reason, self.waiting,
                             self.waiting_noun)
        else:
            self.log.debug("%s: %s; next attempt in %.2f s", self.label, reason, delay)
        self._alarm.set(time.monotonic_ns() + int(delay * 1e9))
        if was_up and self.on_state is not None:
            self.on_state(DOWN)
        self._fail_waiting(f"{self.kind} link lost: {reason}")

    # -- the stall check and the next attempt ----------------------------------------
    def _arm_stall_check(self) -> None:
        self._alarm.set(time.monotonic_ns() + int(self._stall_step() * 1e9))

    def _stall_step(self) -> float:
        return max(0.01, self.reply_timeout / 4)

    def _on_alarm(self) -> None:
        if self.state is DOWN:
            self._connect()
            return
        if self.state is CLOSED:
            return
        # Connecting, or answers due, and none since the last check: stalled.
        if self.state is CONNECTING or (self._awaiting_answers() and self._answers == self._answers_at_check):
            self._stalled_for += self._stall_step()
        else:
            self._stalled_for = 0.0
        self._answers_at_check = self._answers
        if self._stalled_for >= self.reply_timeout:
            self._lost(f"no answer for {self.reply_timeout:g} s")
            return
        self._arm_stall_check()
