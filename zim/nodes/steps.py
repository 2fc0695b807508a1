"""Chaining ``Pending`` results: the steps of a node's store calls (Redis, then the archive)."""
from __future__ import annotations

import logging
from typing import Any, Callable

from zim.pending import Pending
from zim.storage.store import StoreRefusal

log = logging.getLogger("zim.nodes")


def after(pending: Pending, step: Callable[[Any], Any]) -> Pending:
    """A Pending for ``step(value)`` once ``pending`` succeeds: ``step`` returns the
    value, or another Pending to wait on. A failure (or an exception in ``step``)
    settles it with ok=False; a StoreRefusal that ``step`` raises is the value then."""
    result = Pending()
    pending.wait(_run_step, result, step)
    return result


def _run_step(result: Pending, step: Callable[[Any], Any], ok: bool, value: Any) -> None:
    if not ok:
        result.settle(False, value)
        return
    try:
        value = step(value)
    except StoreRefusal as refusal:     # a quota: nothing was stored, the client is told why
        result.settle(False, refusal)
        return
    except Exception as exc:  # noqa: BLE001 -- a bad reply must fail the call, not the loop
        log.exception("a Redis reply could not be used")
        result.settle(False, f"bad reply from redis: {exc}")
        return
    if isinstance(value, Pending):
        value.wait(relay, result, None)
    else:
        result.settle(True, value)


def relay(result: Pending, _: None, ok: bool, value: Any) -> None:
    """A ``wait`` callback settling ``result`` as the awaited Pending settled."""
    result.settle(ok, value)


class Shared(Pending):
    """A Pending that several may wait on (a plain one has one waiter)."""

    __slots__ = ("_others",)

    def __init__(self) -> None:
        super().__init__()
        self._others: list[tuple] = []

    def wait(self, callback: Callable[[Any, Any, bool, Any], None], first: Any, second: Any) -> None:
        if self.outcome is None and self._callback is not None:
            self._others.append((callback, first, second))
            return
        super().wait(callback, first, second)

    def settle(self, ok: bool, value: Any) -> None:
        others, self._others = self._others, []
        super().settle(ok, value)
        self.outcome = (ok, value)      # whoever waits later learns it at once
        for callback, first, second in others:
            callback(first, second, ok, value)


def shared(pending: Pending) -> Shared:
    result = Shared()
    pending.wait(relay, result, None)
    return result


def both(first: Pending, second: Pending) -> Pending:
    """A Pending for ``second``'s value once both succeeded (the first failure otherwise)."""
    return after(first, lambda _: second)
