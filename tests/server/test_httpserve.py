"""zim.httpserve: HTTP/1.1 on a real reactor's loop, over real sockets: paths and
methods, keep-alive and pipelining, malformed and oversized requests, flow
control, caps and idle timeouts. (What /metrics serves: test_metrics_http.py.)

The reactor runs in a thread of the test (``Loop``, tests/server/http_loop.py);
the test talks to it over loopback sockets, and runs code on the loop
(``loop.call``) through an eventfd the reactor watches, the way a handler would run.
"""
from __future__ import annotations

import http.client
import logging
import random
import socket
import time

import pytest

from tests.server import http_loop
from tests.server.http_loop import HOST, RawClient, port_of
from zim.httpserve import split_host_port
from zim.metrics import CONTENT_TYPE, Metrics

loop, serve, metrics = http_loop.loop, http_loop.serve, http_loop.metrics      # fixtures


def test_split_host_port():
    assert split_host_port("127.0.0.1:9100") == ("127.0.0.1", 9100)
    assert split_host_port(":9100") == ("0.0.0.0", 9100)
    assert split_host_port("[::1]:0") == ("::1", 0)
    for bad in ["9100", "host:", "host:x", "host:70000"]:
        with pytest.raises(ValueError):
            split_host_port(bad)


def test_unknown_paths_are_404_and_a_query_string_is_ignored(loop, metrics):
    client = RawClient(port_of(metrics))
    for target in ["/", "/nope", "/metricsx", "/healthz/", "/metrics/x"]:
        assert client.get(target).status == 404, target
    assert client.get("/metrics?name[]=zim").status == 200
    assert client.get("/healthz?x=1").body == b"ok"


def test_methods_other_than_get_and_head_are_405_and_the_connection_ends(loop, metrics):
    port = port_of(metrics)
    client = RawClient(port)
    client.send(b"POST /metrics HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\nhello")
    answer = client.response()
    assert answer.status == 405
    assert answer.headers["allow"] == "GET, HEAD"
    assert answer.headers["connection"] == "close"
    assert client.closed_by_server()
    for method in ["DELETE", "PUT", "OPTIONS"]:
        client = RawClient(port)
        client.request(method, "/healthz")
        assert client.response().status == 405, method
        assert client.closed_by_server()


def test_head_gets_the_length_without_the_body_and_the_connection_goes_on(loop, metrics):
    client = RawClient(port_of(metrics))
    full = client.get("/metrics")
    client.request("HEAD", "/metrics")
    head = client.response(head=True)
    assert head.status == 200
    assert head.headers["content-type"] == CONTENT_TYPE
    assert int(head.headers["content-length"]) == len(full.body)
    # had a body followed the HEAD answer, this would read it as a status line
    assert client.get("/healthz").body == b"ok"


def test_keep_alive_serves_several_requests_on_one_connection(loop, metrics):
    metrics.redis_latency.observe(0.001)
    conn = http.client.HTTPConnection(HOST, port_of(metrics), timeout=5)
    conn.request("GET", "/healthz")
    first = conn.getresponse()
    assert (first.status, first.read()) == (200, b"ok")
    sock = conn.sock
    conn.request("GET", "/metrics")
    second = conn.getresponse()
    assert second.status == 200 and b"zim_redis_call_seconds" in second.read()
    assert conn.sock is sock                    # not reconnected
    assert loop.call(lambda: metrics.server.clients) == 1
    conn.close()


def test_pipelined_requests_are_answered_in_order(loop):
    m = Metrics()
    m.redis_latency.observe(0.001)
    loop.call(lambda: m.serve(loop.reactor, f"{HOST}:0", lambda: (False, "warming up")))
    try:
        client = RawClient(port_of(m))
        client.send(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n"
                    b"GET /readyz HTTP/1.1\r\nHost: t\r\n\r\n"
                    b"HEAD /nope HTTP/1.1\r\nHost: t\r\n\r\n"
                    b"GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n")
        first, second = client.response(), client.response()
        third, fourth = client.response(head=True), client.response()
        assert (first.status, first.body) == (200, b"ok")
        assert (second.status, second.body) == (503, b"warming up")
        assert third.status == 404
        assert fourth.status == 200 and b"zim_redis_call_seconds" in fourth.body
        assert client.buf == b""
    finally:
        loop.call(m.close)


def test_many_pipelined_requests_are_all_answered_across_several_reads(loop, metrics):
    client = RawClient(port_of(metrics))
    # 1,000 requests, about 40 KB: more than one read of the server takes
    client.send(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n" * 1000)
    for _ in range(1000):
        assert client.response().body == b"ok"


def test_a_burst_of_connections_is_all_accepted(loop, metrics):
    clients = [RawClient(port_of(metrics)) for _ in range(40)]   # queued before the loop looks
    for client in clients:
        client.request("GET", "/healthz")
    for client in clients:
        assert client.response().body == b"ok"


def test_answers_leave_at_once(loop, metrics):
    client = RawClient(port_of(metrics))
    client.get("/healthz")
    started = time.monotonic()
    for _ in range(50):
        assert client.get("/healthz").body == b"ok"
    # an answer left in pieces waits on the client's delayed ACK (40 ms each) here
    assert time.monotonic() - started < 1.0


def test_a_malformed_request_gets_400_then_close(loop, metrics):
    port = port_of(metrics)
    for junk in [b"GARBAGE\r\n\r\n", b"GET /metrics HTTP/1.1\r\nno colon here\r\n\r\n",
                 b"GET /metrics HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
                 b"GET /metrics HTTP/1.1\r\nHost: t\r\nContent-Length: x\r\n\r\n"]:
        client = RawClient(port)
        client.send(junk)
        answer = client.response()
        assert answer.status == 400, junk
        assert answer.headers["connection"] == "close"
        assert client.closed_by_server(), junk
    # a request after the bad one, pipelined, is not answered
    client = RawClient(port)
    client.send(b"BAD\r\n\r\nGET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
    assert client.response().status == 400
    assert client.closed_by_server()
    assert RawClient(port).get("/healthz").status == 200


def test_a_request_head_over_the_bound_is_refused_and_closed(loop, serve):
    server = serve(lambda request: (200, [], b"fine"), max_request_size=4096)
    port = port_of(server)
    client = RawClient(port)
    client.send(b"GET / HTTP/1.1\r\nHost: t\r\nX-Pad: " + b"a" * 3000 + b"\r\n\r\n")
    assert client.response().body == b"fine"        # under the bound
    # over the bound plus one read (16 KiB), which h11 may take whole
    client.send(b"GET / HTTP/1.1\r\nHost: t\r\nX-Pad: " + b"a" * 40000 + b"\r\n\r\n")
    assert client.response().status == 431
    assert client.closed_by_server()


def test_http_1_0_without_keep_alive_is_closed_after_its_answer(loop, metrics):
    client = RawClient(port_of(metrics))
    client.send(b"GET /healthz HTTP/1.0\r\n\r\n")
    answer = client.response()
    assert (answer.status, answer.body) == (200, b"ok")
    assert client.closed_by_server()


def test_a_client_that_half_closes_after_its_request_still_gets_the_answer(loop, metrics):
    client = RawClient(port_of(metrics))
    client.request("GET", "/healthz")
    client.sock.shutdown(socket.SHUT_WR)
    assert client.response().body == b"ok"
    assert client.closed_by_server()
    loop.wait_until(lambda: metrics.server.clients == 0)


def test_junk_never_breaks_the_loop_or_the_server(loop, metrics, caplog):
    port = port_of(metrics)
    rng = random.Random(1234)
    payloads = [bytes(rng.randrange(256) for _ in range(rng.randrange(1, 400))) for _ in range(40)]
    payloads += [b"\r\n" * 50, b"GET " + b"/" * 20000 + b" HTTP/1.1\r\n\r\n", b"\x00" * 10,
                 b"GET /metrics HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"]
    with caplog.at_level(logging.DEBUG):
        for payload in payloads:
            client = RawClient(port)
            try:
                client.send(payload)
                client.sock.shutdown(socket.SHUT_WR)
                client.sock.settimeout(5)
                while client.sock.recv(65536):
                    pass
            except ConnectionResetError:
                pass
            client.close()
        assert RawClient(port).get("/healthz").status == 200
        loop.wait_until(lambda: metrics.server.clients == 0)
    failures = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert failures == [], [r.getMessage() for r in failures]


def test_a_handler_that_raises_answers_500_and_the_connection_goes_on(loop, serve):
    def handler(request):
        if request.target == "/boom":
            raise RuntimeError("handler bug")
        return 200, [("Content-Type", "text/plain")], b"fine"

    client = RawClient(port_of(serve(handler)))
    assert client.get("/boom").status == 500
    assert client.get("/").body == b"fine"


# -- flow control and bounds ----------------------------------------------------------------

BIG = bytes(range(256)) * (32 * 4096)      # 32 MiB: more than the kernel buffers of one connection


def test_a_client_that_does_not_read_a_large_answer_does_not_stall_the_loop(loop, serve):
    def handler(request):
        return (200, [], BIG) if request.target == "/big" else (200, [], b"small")

    server = serve(handler)
    port = port_of(server)
    slow = RawClient(port, rcvbuf=4096)
    # pipelined: each answer is made only once the one before has left
    slow.send(b"GET /big HTTP/1.1\r\nHost: t\r\n\r\n" * 2 + b"GET /after HTTP/1.1\r\nHost: t\r\n\r\n")
    loop.wait_until(lambda: server.queued_bytes > 0)       # the kernel did not take it all
    for _ in range(20):                                     # the loop keeps turning...
        assert loop.latency() < 0.5
    others = [RawClient(port) for _ in range(3)]            # ...and serving other clients
    for other in others:
        started = time.monotonic()
        assert other.get("/").body == b"small"
        assert time.monotonic() - started < 1.0
    queued = loop.call(lambda: server.queued_bytes)
    assert 0 < queued <= len(BIG)                           # one answer at most, not two
    slow.sock.settimeout(10)
    for _ in range(2):
        answer = slow.response()
        assert answer.status == 200 and len(answer.body) == len(BIG) and answer.body == BIG
    assert slow.response().body == b"small"
    loop.wait_until(lambda: server.queued_bytes == 0)


def test_connections_over_the_cap_are_accepted_and_closed(loop, serve):
    server = serve(lambda request: (200, [], b"fine"), max_clients=2)
    port = port_of(server)
    first, second = RawClient(port), RawClient(port)
    assert first.get("/").body == b"fine" and second.get("/").body == b"fine"
    third = RawClient(port)
    third.send(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
    assert third.closed_by_server(3)
    assert loop.call(lambda: (server.clients, server.refused)) == (2, 1)
    first.close()
    loop.wait_until(lambda: server.clients == 1)
    fourth = RawClient(port)
    assert fourth.get("/").body == b"fine"
    assert second.get("/").body == b"fine"


def test_tick_closes_connections_idle_longer_than_the_timeout(loop, serve):
    server = serve(lambda request: (200, [], b"fine"), idle_timeout=30)
    port = port_of(server)
    quiet = RawClient(port)
    assert quiet.get("/").body == b"fine"
    loop.wait_until(lambda: server.clients == 1)
    loop.call(lambda: server.tick(time.monotonic() + 29))
    assert loop.call(lambda: server.clients) == 1
    assert quiet.get("/").body == b"fine"
    loop.call(lambda: server.tick(time.monotonic() + 31))
    assert loop.call(lambda: server.clients) == 0
    assert quiet.closed_by_server(2)


def test_idle_timeout_from_the_reactor_tick_spares_busy_clients(loop, serve):
    server = serve(lambda request: (200, [], b"fine"), idle_timeout=1.0)
    loop.call(lambda: loop.ticks.append(server.tick))
    port = port_of(server)
    silent = RawClient(port)                    # connects, never sends
    idle = RawClient(port)
    assert idle.get("/").body == b"fine"        # one request, then nothing
    trickle = RawClient(port)                   # sends bytes, never a whole request
    busy = RawClient(port)
    started = time.monotonic()
    trickled = 0
    trickle_closed = False
    while time.monotonic() - started < 3.5:     # more than 3 timeouts
        assert busy.get("/").body == b"fine"
        if not trickle_closed:
            try:
                trickle.send(b"G" if not trickled else b"x")
                trickled += 1
            except (ConnectionResetError, BrokenPipeError):     # sent after the server closed it
                trickle_closed = True
        time.sleep(0.25)
    assert trickled >= 3
    assert trickle_closed or trickle.closed_by_server(0.5)
    for client in (silent, idle):
        assert client.closed_by_server(0.5)
    assert busy.get("/").body == b"fine"
    assert loop.call(lambda: server.clients) == 1


def test_close_stops_listening_and_closes_every_client(loop, serve):
    server = serve(lambda request: (200, [], b"fine"))
    port = port_of(server)
    client = RawClient(port)
    assert client.get("/").body == b"fine"
    loop.call(server.close)
    assert client.closed_by_server(2)
    with pytest.raises(ConnectionRefusedError):
        RawClient(port)
    loop.call(server.close)                     # idempotent
    assert loop.latency() < 1.0                 # the loop goes on without it
