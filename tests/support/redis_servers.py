"""A real redis-server for tests, and a way to script a test inside a reactor's loop.

A test module uses the fixture by naming it at module level
(``redis_server = redis_servers.redis_server``) and marks itself with
``requires_redis_server``: without redis-server installed it is skipped, saying
why (CI installs it).
"""
from __future__ import annotations

import time
from typing import Callable, Generator, Iterator

import pytest

from zim._core import Reactor
from zim.testing.redis import LocalRedis, redis_server_binary

requires_redis_server = pytest.mark.skipif(
    redis_server_binary() is None,
    reason="redis-server is not installed (apt-get install redis-server; CI installs it)")

BEAT_S = 0.005


@pytest.fixture
def redis_server() -> Iterator[LocalRedis]:
    """``redis-server --port P --bind 127.0.0.1 --save "" --appendonly no --dir TMP``
    on a free port, answering PING; stopped (and its directory removed) at the end."""
    server = LocalRedis().start()
    try:
        yield server
    finally:
        server.close()


Script = Generator[Callable[[], bool], None, None]


def run_in_loop(reactor: Reactor, script: Script, timeout: float = 20.0) -> list[float]:
    """Run ``reactor``'s loop with ``script`` inside it, and return the times of
    the loop's heartbeats.

    A heartbeat (a timer every 5 ms, on the loop) resumes the script whenever
    the condition it last yielded holds; everything it does runs on the loop, as
    a handler would. The loop stops when the script ends; an exception in it, or
    ``timeout`` seconds, fail the test. A reactor runs only once (until stop).
    """
    beats: list[float] = []
    condition: list[Callable[[], bool]] = [lambda: True]
    failure: list[BaseException] = []
    deadline = time.monotonic() + timeout

    def beat() -> None:
        beats.append(time.monotonic())
        try:
            while condition[0]():
                condition[0] = next(script)
        except StopIteration:
            reactor.stop()
            return
        except BaseException as exc:
            failure.append(exc)
            reactor.stop()
            return
        if beats[-1] > deadline:
            failure.append(TimeoutError(f"the script waited more than {timeout} s"))
            reactor.stop()
            return
        alarm.set(time.monotonic_ns() + int(BEAT_S * 1e9))

    alarm = reactor.timer(beat)
    alarm.set(time.monotonic_ns())
    try:
        reactor.run()
    finally:
        alarm.close()
        script.close()
    if failure:
        raise failure[0]
    return beats


def after(seconds: float) -> Callable[[], bool]:
    """A condition for ``run_in_loop``: ``seconds`` have passed."""
    until = time.monotonic() + seconds
    return lambda: time.monotonic() >= until
