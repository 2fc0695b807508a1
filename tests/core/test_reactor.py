"""The reactor's own API, in process: wake-ups from other threads, stop()."""
from __future__ import annotations

import os
import threading
import time

import pytest

from zim._core import Reactor


def test_watch_runs_the_callback_on_wakeups_from_another_thread():
    reactor = Reactor(65536, lambda *args: None)
    wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    seen: list[int] = []

    def on_wake() -> None:
        seen.append(os.eventfd_read(wake))      # drain: the watch is edge-triggered
        if sum(seen) >= 10:
            reactor.stop()

    reactor.watch(wake, on_wake)

    def writer() -> None:
        for _ in range(10):
            os.eventfd_write(wake, 1)
            time.sleep(0.01)

    thread = threading.Thread(target=writer)
    started = time.monotonic()
    thread.start()
    reactor.run()
    thread.join()
    assert sum(seen) == 10
    assert time.monotonic() - started < 5
    reactor.unwatch(wake)
    with pytest.raises(ValueError):
        reactor.unwatch(wake) or reactor.watch(-1, on_wake)
    os.close(wake)


def test_watch_refuses_a_descriptor_in_use():
    reactor = Reactor(65536, lambda *args: None)
    read_end, write_end = os.pipe()
    reactor.watch(read_end, lambda: None)
    with pytest.raises(ValueError):
        reactor.watch(read_end, lambda: None)
    reactor.unwatch(read_end)
    reactor.watch(read_end, lambda: None)       # free again after unwatch
    reactor.unwatch(read_end)
    os.close(read_end)
    os.close(write_end)


def test_stop_before_run_returns_at_once():
    reactor = Reactor(65536, lambda *args: None)
    reactor.stop()
    started = time.monotonic()
    reactor.run()
    assert time.monotonic() - started < 1.5
