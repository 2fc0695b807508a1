"""``Pending``: a result that comes later, settled once from the loop.

Shared by everything that answers after a round trip: the stores (a durable
store's writer process, Redis), the Redis links, and the pacing of one user's
store calls (``zim.limits.PacedLine``). Handlers wait on one with ``ctx.later``.
"""
from __future__ import annotations

from typing import Any, Callable


class Pending:
    """A store result that comes later: a durable store answers once the batch
    holding the call is committed. The store calls ``settle(True, value)`` or
    ``settle(False, reason)`` exactly once; whoever waits registers with
    ``wait(callback, first, second)`` and gets ``callback(first, second, ok, value)``
    (a handler waits with ``ctx.later``). No closure per call: thousands may be
    waiting at once during a login storm, and each costs memory until settled."""

    __slots__ = ("_callback", "_first", "_second", "outcome")

    def __init__(self) -> None:
        self._callback: Callable[[Any, Any, bool, Any], None] | None = None
        self._first: Any = None
        self._second: Any = None
        self.outcome: tuple[bool, Any] | None = None    # settled before anyone waited

    def wait(self, callback: Callable[[Any, Any, bool, Any], None], first: Any, second: Any) -> None:
        if self.outcome is not None:
            callback(first, second, *self.outcome)
            return
        self._callback, self._first, self._second = callback, first, second

    def settle(self, ok: bool, value: Any) -> None:
        callback = self._callback
        if callback is None:
            self.outcome = (ok, value)
            return
        first, second = self._first, self._second
        self._callback = self._first = self._second = None
        callback(first, second, ok, value)


def gather(results: list[Any]) -> Pending:
    """A Pending of the list of ``results``' values (each a Pending or a plain
    value), settled once all have; a failure settles it with the first failure."""
    total = Pending()
    values: list[Any] = [None] * len(results)
    state = [len(results), False]       # results still to come, failed already
    if not results:
        total.settle(True, values)
    for index, result in enumerate(results):
        if isinstance(result, Pending):
            result.wait(_gathered, (total, values, state), index)
        else:
            _gathered((total, values, state), index, True, result)
    return total


def _gathered(shared: tuple, index: int, ok: bool, value: Any) -> None:
    total, values, state = shared
    if state[1]:
        return
    if not ok:
        state[1] = True
        total.settle(False, value)
        return
    values[index] = value
    state[0] -= 1
    if not state[0]:
        total.settle(True, values)
