"""RedisLink against a real redis-server, inside a running zim Reactor."""
from __future__ import annotations

import time

import pytest
import redis
from hypothesis import given
from hypothesis import strategies as st

from tests.support import redis_servers
from tests.support.redis_servers import after, requires_redis_server, run_in_loop
from zim._core import Reactor
from zim.backoff import BACKOFF_JITTER, backoff_delay, jittered
from zim.nodes.link import RedisLink
from zim.pending import Pending

redis_server = redis_servers.redis_server

# Seconds: reconnecting fast keeps the tests short.
QUICK = {"first_backoff": 0.02, "max_backoff": 0.1}


def new_reactor() -> Reactor:
    return Reactor(65536, lambda *packet: None)


def link_in_new_reactor(server, **options) -> tuple[Reactor, RedisLink]:
    """A reactor (not running yet) and a link from it to ``server``."""
    reactor = new_reactor()
    return reactor, RedisLink(reactor, server.host, server.port, **options)


def settled(*pendings: Pending):
    """A condition: every one of these has settled (nobody waits on them)."""
    return lambda: all(p.outcome is not None for p in pendings)


# -- the backoff schedule (pure) ------------------------------------------------------------

@given(st.integers(1, 10_000), st.floats(0.001, 1.0), st.floats(1.0, 60.0))
def test_backoff_never_exceeds_its_cap_and_never_shrinks(failures, first, cap):
    delay = backoff_delay(failures, first, cap)
    assert first <= delay <= cap or delay == cap
    assert backoff_delay(failures + 1, first, cap) >= delay


@given(st.integers(1, 30), st.floats(0.001, 1.0))
def test_backoff_starts_at_first_and_doubles_below_the_cap(failures, first):
    cap = 1e12
    assert backoff_delay(1, first, cap) == first
    assert backoff_delay(failures + 1, first, cap) == pytest.approx(2 * backoff_delay(failures, first, cap))


@given(st.integers(1, 100), st.floats(0.0, 1.0, exclude_max=True))
def test_jitter_only_shortens_a_delay_and_by_at_most_a_quarter(failures, draw):
    delay = backoff_delay(failures)
    assert (1 - BACKOFF_JITTER) * delay <= jittered(delay, draw) <= delay
    assert jittered(delay, 0.0) == delay


def test_backoff_reaches_the_cap_and_counts_from_one():
    assert backoff_delay(7, 0.05, 2.0) == 2.0
    with pytest.raises(ValueError):
        backoff_delay(0)


# -- against redis-server --------------------------------------------------------------

@requires_redis_server
def test_calls_and_pipelines_settle_in_order_with_their_replies(redis_server):
    reactor, link = link_in_new_reactor(redis_server)
    order = []

    def record(tag, _unused, ok, value):         # the waiter's signature: Pending.wait
        order.append((tag, ok, value))

    def script():
        link.call("SET", "k", "v").wait(record, "set", None)
        link.pipeline([("INCR", "n"), ("INCR", "n"), ("GET", "k")]).wait(record, "pipeline", None)
        link.call("INCRBY", "n", 40).wait(record, "incrby", None)
        link.call("LPUSH", "k", "x").wait(record, "wrong type", None)
        link.pipeline([("INCR", "n"), ("LPUSH", "k", "x")]).wait(record, "pipeline with an error", None)
        with pytest.raises(ValueError):
            link.pipeline([])
        link.call("GET", "n").wait(record, "get", None)
        yield lambda: len(order) == 6

    beats = run_in_loop(reactor, script())
    link.close()
    assert [tag for tag, _, _ in order] == [
        "set", "pipeline", "incrby", "wrong type", "pipeline with an error", "get"]
    results = {tag: (ok, value) for tag, ok, value in order}
    assert results["set"] == (True, b"OK")
    assert results["pipeline"] == (True, [1, 2, b"v"])
    assert results["incrby"] == (True, 42)
    assert results["wrong type"][0] is False and "WRONGTYPE" in results["wrong type"][1]
    assert results["pipeline with an error"][0] is False      # its INCR ran all the same:
    assert results["get"] == (True, b"43")
    assert len(beats) >= 2


@requires_redis_server
def test_many_concurrent_calls_keep_their_order(redis_server):
    reactor, link = link_in_new_reactor(redis_server)
    values = []

    def record(_first, _second, ok, value):
        values.append(value if ok else None)

    def script():
        yield lambda: link.state == "up"
        for i in range(3000):
            if i % 3:
                link.call("INCR", "counter").wait(record, None, None)
            else:
                link.pipeline([("INCR", "counter"), ("INCR", "counter")]).wait(record, None, None)
        assert link.waiting == 3000
        yield lambda: len(values) == 3000

    run_in_loop(reactor, script())
    link.close()
    flat = [n for value in values for n in (value if isinstance(value, list) else [value])]
    assert flat == list(range(1, 4001))


@requires_redis_server
def test_large_values_cross_the_socket_in_pieces(redis_server):
    # 8 MB each way: more than the socket buffers take at once (partial sends, many reads)
    reactor, link = link_in_new_reactor(redis_server)
    big = bytes(range(256)) * (8 * 4096)

    def script():
        stored = link.call("SET", "big", big)
        fetched = link.call("GET", "big")
        yield settled(stored, fetched)
        assert stored.outcome == (True, b"OK")
        assert fetched.outcome == (True, big)

    run_in_loop(reactor, script())
    link.close()


@requires_redis_server
def test_a_killed_redis_fails_every_waiting_call_and_the_link_recovers(redis_server):
    states = []
    reactor, link = link_in_new_reactor(redis_server, on_state=states.append, **QUICK)

    def script():
        yield lambda: link.state == "up"
        # frozen first, so that none of these can have been answered when it dies
        redis_server.pause()
        waiting = [link.call("INCR", "x") for _ in range(50)]
        waiting.append(link.pipeline([("INCR", "x"), ("GET", "x")]))
        yield after(0.05)
        redis_server.kill()
        yield settled(*waiting)
        assert all(p.outcome[0] is False for p in waiting), [p.outcome for p in waiting]
        assert link.state != "up"

        # while Redis is away: calls fail at once (down) or with the next attempt
        started = time.monotonic()
        while_down = []
        for _ in range(5):
            yield lambda: link.state == "down"
            while_down.append(link.call("PING"))
            assert while_down[-1].outcome is not None and while_down[-1].outcome[0] is False
        assert time.monotonic() - started < 2.0
        yield lambda: link.failures >= 3

        redis_server.start()
        yield lambda: link.state == "up"
        back = link.pipeline([("INCR", "x"), ("PING",)])
        yield settled(back)
        assert back.outcome == (True, [1, b"PONG"])      # a new, empty server

    run_in_loop(reactor, script())
    link.close()
    assert states == ["up", "down", "up"]
    assert link.connections == 2


@requires_redis_server
def test_the_reactor_keeps_serving_while_redis_is_frozen(redis_server):
    reactor, link = link_in_new_reactor(redis_server)
    window = {}

    def script():
        yield lambda: link.state == "up"
        redis_server.pause()
        window["start"] = time.monotonic()
        answer = link.call("PING")
        yield after(1.0)
        window["end"] = time.monotonic()
        assert answer.outcome is None
        redis_server.resume()
        yield settled(answer)
        assert answer.outcome == (True, b"PONG")

    beats = run_in_loop(reactor, script())
    link.close()
    frozen = [t for t in beats if window["start"] <= t <= window["end"]]
    gaps = [b - a for a, b in zip(frozen, frozen[1:])]
    assert len(frozen) >= 50            # a beat every 5 ms: about 200 in that second
    assert max(gaps) < 0.1


@requires_redis_server
def test_a_stalled_redis_fails_calls_after_the_reply_timeout_and_the_link_recovers(redis_server):
    reactor, link = link_in_new_reactor(redis_server, reply_timeout=0.3, **QUICK)

    def script():
        yield lambda: link.state == "up"
        redis_server.pause()
        started = time.monotonic()
        stalled = link.call("INCR", "y")
        yield settled(stalled)
        assert stalled.outcome[0] is False and "no answer" in stalled.outcome[1]
        assert 0.25 <= time.monotonic() - started < 1.5
        redis_server.resume()
        yield lambda: link.state == "up"
        again = link.call("PING")
        yield settled(again)
        assert again.outcome == (True, b"PONG")

    run_in_loop(reactor, script())
    link.close()


@requires_redis_server
def test_close_fails_what_waits_and_everything_after(redis_server):
    reactor, link = link_in_new_reactor(redis_server)

    def script():
        yield lambda: link.state == "up"
        redis_server.pause()
        waiting = link.call("PING")
        link.close()
        assert waiting.outcome == (False, "redis link closed")
        assert link.call("PING").outcome == (False, "redis link closed")
        redis_server.resume()

    run_in_loop(reactor, script())


@requires_redis_server
def test_a_url_selects_the_database_and_a_refused_password_fails_the_calls(redis_server):
    reactor = new_reactor()
    link = RedisLink.from_url(reactor, f"redis://{redis_server.host}:{redis_server.port}/3")
    refused = RedisLink.from_url(reactor, f"redis://:secret@{redis_server.host}:{redis_server.port}/0",
                                 **QUICK)

    def script():
        stored = link.call("SET", "where", "db3")
        denied = refused.call("PING")
        yield settled(stored, denied)
        assert stored.outcome == (True, b"OK")
        assert denied.outcome[0] is False and "AUTH" in denied.outcome[1]
        assert refused.state != "up" and refused.connections == 0

    run_in_loop(reactor, script())
    link.close()
    refused.close()
    check = redis.Redis(host=redis_server.host, port=redis_server.port, db=3)
    assert check.get("where") == b"db3"
    check.close()
