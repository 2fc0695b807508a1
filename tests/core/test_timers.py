"""Reactor.timer: one-shot timers run from the loop (zim/core/timers.pyx), in process.

Deadlines are on time.monotonic_ns()'s clock. Windows are wide (the machine may be
busy): what is checked to the nanosecond is that nothing fires before its deadline.
"""
from __future__ import annotations

import logging
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zim._core import Reactor, Timer

SECOND = 1_000_000_000


def new_reactor() -> Reactor:
    return Reactor(65536, lambda *args: None)


def run_until(reactor: Reactor, seconds: float) -> float:
    """Run the loop until a stop timer ``seconds`` from now; returns the time it ran.
    (A reactor runs once: stop() is for good.)"""
    stopper = reactor.timer(reactor.stop)
    stopper.set(time.monotonic_ns() + int(seconds * SECOND))
    started = time.monotonic()
    reactor.run()
    stopper.close()
    return time.monotonic() - started


def recorder(fired: list, name: object = None):
    return lambda: fired.append((name, time.monotonic_ns()))


def test_a_timer_fires_once_after_its_deadline_and_not_before():
    reactor = new_reactor()
    fired: list = []
    timer = reactor.timer(recorder(fired))
    deadline = time.monotonic_ns() + SECOND // 5
    timer.set(deadline)
    assert timer.deadline == deadline
    run_until(reactor, 1.0)
    assert len(fired) == 1
    assert deadline <= fired[0][1] < deadline + int(0.75 * SECOND)
    assert timer.deadline is None               # one-shot: not armed any more


def test_a_past_deadline_fires_on_the_next_pass():
    reactor = new_reactor()
    fired: list = []
    reactor.timer(recorder(fired)).set(0)
    assert run_until(reactor, 0.3) < 5
    assert len(fired) == 1


def test_set_replaces_the_deadline_set_before():
    reactor = new_reactor()
    fired: list = []
    sooner, later = reactor.timer(recorder(fired, "sooner")), reactor.timer(recorder(fired, "later"))
    now = time.monotonic_ns()
    sooner.set(now + 60 * SECOND)
    sooner.set(now + SECOND // 10)              # brought forward
    later.set(now + SECOND // 10)
    later.set(now + SECOND // 2)                # put back
    run_until(reactor, 1.5)
    assert [name for name, _ in fired] == ["sooner", "later"]
    assert fired[1][1] >= now + SECOND // 2


def test_cancel_prevents_the_callback_and_close_ends_the_timer():
    reactor = new_reactor()
    fired: list = []
    cancelled, closed = reactor.timer(recorder(fired, "cancelled")), reactor.timer(recorder(fired, "closed"))
    cancelled.set(time.monotonic_ns() + SECOND // 10)
    closed.set(time.monotonic_ns() + SECOND // 10)
    cancelled.cancel()
    closed.close()
    closed.close()                              # twice: harmless
    assert cancelled.deadline is None and closed.deadline is None
    run_until(reactor, 0.5)
    assert fired == []
    with pytest.raises(ValueError):
        closed.set(0)


def test_a_cancelled_timer_can_be_set_again():
    reactor = new_reactor()
    fired: list = []
    timer = reactor.timer(recorder(fired))
    timer.set(0)
    timer.cancel()
    timer.set(1)
    run_until(reactor, 0.2)
    assert len(fired) == 1


def test_a_callback_may_cancel_another_timer_due_in_the_same_pass():
    reactor = new_reactor()
    fired: list = []
    second = reactor.timer(recorder(fired, "second"))
    first = reactor.timer(lambda: (fired.append(("first", 0)), second.cancel()))
    first.set(1)
    second.set(2)
    run_until(reactor, 0.3)
    assert [name for name, _ in fired] == ["first"]


def test_timers_fire_in_deadline_order_and_sub_second_deadlines_do_not_wait_for_the_tick():
    reactor = new_reactor()
    fired: list = []
    now = time.monotonic_ns()
    steps = [5, 1, 4, 2, 3]                     # x 40 ms, set out of order
    timers = [reactor.timer(recorder(fired, step)) for step in steps]
    for step, timer in zip(steps, timers):
        timer.set(now + step * 40_000_000)
    took = run_until(reactor, 0.5)
    assert [name for name, _ in fired] == [1, 2, 3, 4, 5]
    for step, at in fired:
        assert at >= now + step * 40_000_000
    # A chain of ten 20 ms timers, each set by the last: far under the loop's 1 s tick each.
    reactor = new_reactor()
    chain: list[int] = []

    def link() -> None:
        chain.append(time.monotonic_ns())
        if len(chain) < 10:
            relay.set(time.monotonic_ns() + 20_000_000)
        else:
            reactor.stop()

    relay = reactor.timer(link)
    relay.set(0)
    started = time.monotonic()
    reactor.run()
    assert len(chain) == 10
    assert time.monotonic() - started < max(3.0, 5 * took)


def test_a_callback_setting_itself_in_the_past_runs_once_a_pass_not_in_a_loop():
    reactor = new_reactor()
    runs = [0]

    def again() -> None:
        runs[0] += 1
        itself.set(0)

    itself = reactor.timer(again)
    itself.set(0)
    assert run_until(reactor, 0.3) < 5         # the stop timer still got its turn
    assert runs[0] >= 2


def test_a_failing_callback_is_logged_and_the_loop_goes_on(caplog):
    reactor = new_reactor()
    fired: list = []

    def fail() -> None:
        raise RuntimeError("boom")

    reactor.timer(fail).set(0)
    reactor.timer(recorder(fired, "after")).set(time.monotonic_ns() + SECOND // 10)
    with caplog.at_level(logging.ERROR, logger="zim.core"):
        run_until(reactor, 0.5)
    assert [name for name, _ in fired] == ["after"]
    assert "timer callback failed" in caplog.text and "boom" in caplog.text


def test_system_exit_in_a_callback_stops_the_loop(caplog):
    reactor = new_reactor()

    def leave() -> None:
        raise SystemExit(0)

    reactor.timer(leave).set(0)
    with caplog.at_level(logging.ERROR, logger="zim.core"):
        assert run_until(reactor, 30) < 10


def test_a_callback_must_be_callable_and_timers_belong_to_a_reactor():
    reactor = new_reactor()
    with pytest.raises(TypeError):
        reactor.timer(None)
    with pytest.raises(TypeError):
        Timer(None, lambda: None)
    assert isinstance(reactor.timer(lambda: None), Timer)


# Many timers set, set again and cancelled, all due in one pass: they fire in the order
# of (deadline, when set), cancelled ones not at all, each once (the heap's invariant).
operation = st.tuples(st.sampled_from(["set", "cancel"]), st.integers(0, 7), st.integers(1, 6))


@settings(max_examples=150, deadline=None)
@given(st.lists(operation, max_size=40))
def test_timers_due_together_fire_in_deadline_then_set_order(operations):
    reactor = new_reactor()
    fired: list[int] = []
    timers = [reactor.timer(lambda index=index: fired.append(index)) for index in range(8)]
    armed: dict[int, tuple[int, int]] = {}      # index -> (deadline, order): the model
    for order, (kind, index, deadline) in enumerate(operations):
        if kind == "set":
            timers[index].set(deadline)         # nanoseconds after the clock's start: all past
            armed[index] = (deadline, order)
        else:
            timers[index].cancel()
            armed.pop(index, None)
        assert timers[index].deadline == armed.get(index, (None,))[0]
    stopper = reactor.timer(reactor.stop)
    stopper.set(7)                              # after every other deadline, in the same pass
    reactor.run()
    assert fired == sorted(armed, key=armed.__getitem__)
