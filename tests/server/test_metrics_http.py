"""zim.httpserve and zim.metrics: HTTP on a real reactor's loop, over real sockets,
and a real Prometheus scraping it.

The reactor runs in a thread of the test (``Loop``); the test talks to it over
loopback sockets, and runs code on the loop (``loop.call``) through an eventfd
the reactor watches, the way a handler would run.
"""
from __future__ import annotations

import http.client
import logging
import os
import queue
import random
import socket
import threading
import time
from typing import Any, Callable, Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support import prometheus as prometheus_fixtures
from zim._core import Reactor
from zim.httpserve import HttpServer, split_host_port
from zim.metrics import (
    APP_FAMILIES, CONTENT_TYPE, CORE_COUNTERS, CORE_TABLE, Metrics, combine_core_values, core_families,
    families_from_counts,
)
from zim.storage.batchstats import BatchStats

prometheus = prometheus_fixtures.prometheus

HOST = "127.0.0.1"


# -- the loop in a thread ----------------------------------------------------------------

class Loop:
    """A zim Reactor running in a thread; ``call(fn)`` runs fn on its loop."""

    def __init__(self) -> None:
        self.reactor = Reactor(65536, lambda *packet: None)
        self.wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.calls: queue.SimpleQueue = queue.SimpleQueue()
        self.reactor.watch(self.wake, self._on_wake)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="reactor", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.reactor.run()
        except BaseException as exc:        # reported by stop()
            self.error = exc

    def _on_wake(self) -> None:
        try:
            os.eventfd_read(self.wake)      # drain: the watch is edge-triggered
        except BlockingIOError:
            pass
        while True:
            try:
                fn, box, done = self.calls.get_nowait()
            except queue.Empty:
                return
            try:
                box.append((True, fn()))
            except BaseException as exc:
                box.append((False, exc))
            done.set()

    def call(self, fn: Callable[[], Any], timeout: float = 5.0) -> Any:
        """fn() run on the loop; its result (or its exception, raised here)."""
        done = threading.Event()
        box: list = []
        self.calls.put((fn, box, done))
        os.eventfd_write(self.wake, 1)
        if not done.wait(timeout):
            raise AssertionError(f"the loop did not run a call within {timeout} s")
        ok, value = box[0]
        if not ok:
            raise value
        return value

    def latency(self) -> float:
        """Seconds for a call to come back from the loop."""
        started = time.monotonic()
        self.call(lambda: None)
        return time.monotonic() - started

    def wait_until(self, condition: Callable[[], bool], timeout: float = 5.0) -> None:
        """Poll ``condition`` on the loop until it holds."""
        deadline = time.monotonic() + timeout
        while not self.call(condition):
            if time.monotonic() > deadline:
                raise AssertionError("condition not met in time")
            time.sleep(0.02)

    def stop(self) -> None:
        if self.thread.is_alive():
            self.call(self.reactor.stop)
            self.thread.join(10)
            assert not self.thread.is_alive(), "the reactor did not stop"
        self.reactor.unwatch(self.wake)
        os.close(self.wake)
        if self.error is not None:
            raise self.error


@pytest.fixture
def loop() -> Iterator[Loop]:
    running = Loop()
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture
def serve(loop: Loop) -> Iterator[Callable[..., HttpServer]]:
    """``serve(handler, **options)``: an HttpServer on a free loopback port, made on
    the loop; closed at the end."""
    servers: list[HttpServer] = []

    def start(handler, **options) -> HttpServer:
        server = loop.call(lambda: HttpServer(loop.reactor, HOST, 0, handler, **options))
        servers.append(server)
        return server

    yield start
    for server in servers:
        loop.call(server.close)


@pytest.fixture
def metrics(loop: Loop) -> Iterator[Metrics]:
    """A Metrics (no source) served on a free loopback port, ready; closed at the end."""
    m = Metrics()
    loop.call(lambda: m.serve(loop.reactor, f"{HOST}:0"))
    yield m
    loop.call(m.close)


# -- a raw HTTP client -----------------------------------------------------------------

class Response:
    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def __repr__(self) -> str:
        return f"Response({self.status}, {self.headers}, {self.body[:80]!r})"


class RawClient:
    """A blocking client socket that writes raw bytes and reads HTTP/1.1 answers."""

    def __init__(self, port: int, rcvbuf: int | None = None, timeout: float = 5.0) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:      # before connect, so the window starts small
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(timeout)
        self.sock.connect((HOST, port))
        self.buf = bytearray()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def request(self, method: str, target: str, *extra: str) -> None:
        lines = [f"{method} {target} HTTP/1.1", "Host: test", *extra, "", ""]
        self.send("\r\n".join(lines).encode())

    def _fill(self) -> None:
        data = self.sock.recv(1 << 20)
        if not data:
            raise EOFError("the server closed the connection")
        self.buf += data

    def response(self, head: bool = False) -> Response:
        while b"\r\n\r\n" not in self.buf:
            self._fill()
        end = self.buf.index(b"\r\n\r\n")
        raw = bytes(self.buf[:end])
        del self.buf[:end + 4]
        status_line, *lines = raw.decode("latin-1").split("\r\n")
        version, status = status_line.split(" ")[:2]
        assert version == "HTTP/1.1", status_line
        headers = {}
        for line in lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = 0 if head else int(headers["content-length"])
        while len(self.buf) < length:
            self._fill()
        body = bytes(self.buf[:length])
        del self.buf[:length]
        return Response(int(status), headers, body)

    def get(self, target: str) -> Response:
        self.request("GET", target)
        return self.response()

    def closed_by_server(self, timeout: float = 5.0) -> bool:
        """True once the server has closed (EOF or reset) within timeout, with no
        further bytes; False if it stays open."""
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(65536)
        except socket.timeout:
            return False
        except ConnectionResetError:
            return True
        assert not data, f"unexpected bytes: {data[:100]!r}"
        return True

    def close(self) -> None:
        self.sock.close()


def port_of(server_or_metrics) -> int:
    server = server_or_metrics.server if isinstance(server_or_metrics, Metrics) else server_or_metrics
    return server.address[1]


def samples(body: bytes) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} of a text-format body (parsed by prometheus_client)."""
    out = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def types(body: bytes) -> dict[str, str]:
    return {line.split()[2]: line.split()[3] for line in body.decode().splitlines() if line.startswith("# TYPE ")}


# -- the mapping of the C counters (no sockets) -------------------------------------------------

def test_core_families_name_every_c_counter_of_the_core():
    from zim._core import COUNTER_NAMES, GAUGE_NAMES

    # every counter the core keeps has its place (errors_* join the App's zim_errors_total)
    assert set(CORE_COUNTERS) == {name for name in COUNTER_NAMES if not name.startswith("errors_")}
    values = {name: 100 + i for i, name in enumerate(CORE_COUNTERS)}
    m = Metrics()
    m.add_source(lambda: core_families(values))
    got = samples(m.render())
    n = {name: float(value) for name, value in values.items()}
    expected = {
        ("zim_connections_accepted_total", ()): n["accepted"],
        **{("zim_connections_closed_total", (("reason", r),)): n[f"closed_{r}"]
           for r in ["peer", "login_timeout", "idle_timeout", "too_large", "protocol_error", "output_cap",
                     "fd_limit", "shutdown", "server", "no_memory", "memory_budget", "origin",
                     "address_limit"]},
        **{("zim_requests_total", (("action", str(a)),)): n[f"requests_action_{a}"] for a in range(16)},
        ("zim_requests_total", (("action", "other"),)): n["requests_action_other"],
        ("zim_deliveries_total", (("kind", "user"),)): n["deliveries_user"],
        ("zim_deliveries_total", (("kind", "channel"),)): n["deliveries_channel"],
        ("zim_bytes_received_total", ()): n["bytes_in"],
        ("zim_bytes_sent_total", ()): n["bytes_out"],
        ("zim_link_bytes_received_total", ()): n["link_bytes_in"],
        ("zim_link_bytes_sent_total", ()): n["link_bytes_out"],
        ("zim_ws_compressed_messages_total", (("direction", "out"),)): n["deflated_out"],
        ("zim_ws_compressed_messages_total", (("direction", "in"),)): n["inflated_in"],
        ("zim_connections", (("transport", "tcp"),)): n["connections_tcp"],
        ("zim_connections", (("transport", "ws"),)): n["connections_ws"],
        ("zim_connections_logged_in", ()): n["logged_in"],
        ("zim_links", ()): n["links"],
        ("zim_output_queued_bytes", ()): n["outbuf_bytes"],
        ("zim_output_queued_max_bytes", ()): n["outbuf_max_bytes"],
        ("zim_link_queue_bytes", ()): n["link_queue_bytes"],
    }
    core = {key: value for key, value in got.items() if key[0] in {k[0] for k in expected}}
    assert core == expected
    kinds = types(m.render())
    gauges = {CORE_COUNTERS[name][0] for name in GAUGE_NAMES}      # the core's gauges, and only they
    for name, kind, _, _ in CORE_TABLE:
        assert kinds[name] == kind == ("gauge" if name in gauges else "counter"), name


def test_core_families_skip_unknown_names_and_combine_sums_but_takes_the_max_queue(caplog):
    per_worker = [{"accepted": 3, "outbuf_max_bytes": 10, "connections_tcp": 2, "brand_new": 1},
                  {"accepted": 4, "outbuf_max_bytes": 70, "connections_tcp": 1},
                  {"accepted": 5, "outbuf_max_bytes": 0}]
    combined = combine_core_values(per_worker)
    assert combined == {"accepted": 12, "outbuf_max_bytes": 70, "connections_tcp": 3, "brand_new": 1}
    with caplog.at_level(logging.WARNING, logger="zim.metrics"):
        families = core_families(combined)
    assert {f.name: [s.value for s in f.samples] for f in families} == {
        "zim_connections_accepted": [12], "zim_connections": [3], "zim_output_queued_max_bytes": [70]}
    assert "brand_new" in caplog.text


def test_families_from_counts_refuse_what_the_table_does_not_describe():
    table = [("t_total", "counter", "a counter", None), ("t_gauge", "gauge", "a gauge", "kind")]
    families = families_from_counts(table, {("t_gauge", "a"): 2, "t_total": 1, ("t_gauge", "b"): 3})
    assert [(f.name, f.type) for f in families] == [("t", "counter"), ("t_gauge", "gauge")]
    assert [(s.name, s.labels, s.value) for s in families[1].samples] == [
        ("t_gauge", {"kind": "a"}, 2), ("t_gauge", {"kind": "b"}, 3)]
    assert families_from_counts(table, {}) == []
    with pytest.raises(ValueError):
        families_from_counts(table, {"nope": 1})
    with pytest.raises(ValueError):
        families_from_counts(table, {"t_gauge": 1})             # needs its label
    with pytest.raises(ValueError):
        families_from_counts(table, {("t_total", "x"): 1})      # takes none
    assert {row[0] for row in CORE_TABLE} == {target[0] for target in CORE_COUNTERS.values() if target}


def test_split_host_port():
    assert split_host_port("127.0.0.1:9100") == ("127.0.0.1", 9100)
    assert split_host_port(":9100") == ("0.0.0.0", 9100)
    assert split_host_port("[::1]:0") == ("::1", 0)
    for bad in ["9100", "host:", "host:x", "host:70000"]:
        with pytest.raises(ValueError):
            split_host_port(bad)


# -- the endpoints -------------------------------------------------------------------------

def test_metrics_serves_sources_and_instruments_read_at_each_scrape(loop, metrics):
    workers = [{"accepted": 3, "closed_peer": 1, "closed_idle_timeout": 2, "requests_action_2": 5,
                "connections_tcp": 4, "outbuf_max_bytes": 10},
               {"accepted": 4, "closed_peer": 2, "requests_action_other": 1, "connections_ws": 2,
                "outbuf_max_bytes": 30}]
    app_values = {("zim_errors_total", "bad_request"): 2, "zim_logins_total": 1,
                  ("zim_rate_limited_total", "user"): 0, ("zim_redis_link_up", "10.0.0.1:6379"): 1}
    stats, fd = BatchStats.create()
    os.close(fd)
    metrics.add_source(lambda: core_families(combine_core_values(workers)))
    metrics.add_source(lambda: families_from_counts(APP_FAMILIES, app_values))
    metrics.add_source(stats.families)
    stats.record(3, 0.002)
    metrics.redis_latency.observe(0.0003)
    client = RawClient(port_of(metrics))
    answer = client.get("/metrics")
    assert answer.status == 200
    assert answer.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8" == CONTENT_TYPE
    got = samples(answer.body)
    assert got[("zim_connections_accepted_total", ())] == 7
    assert got[("zim_connections_closed_total", (("reason", "peer"),))] == 3
    assert got[("zim_connections_closed_total", (("reason", "idle_timeout"),))] == 2
    assert got[("zim_requests_total", (("action", "2"),))] == 5
    assert got[("zim_requests_total", (("action", "other"),))] == 1
    assert got[("zim_connections", (("transport", "tcp"),))] == 4
    assert got[("zim_connections", (("transport", "ws"),))] == 2
    assert got[("zim_output_queued_max_bytes", ())] == 30
    assert got[("zim_errors_total", (("code", "bad_request"),))] == 2
    assert got[("zim_logins_total", ())] == 1
    assert got[("zim_rate_limited_total", (("scope", "user"),))] == 0
    assert got[("zim_store_batch_operations_bucket", (("le", "2.0"),))] == 0
    assert got[("zim_store_batch_operations_bucket", (("le", "5.0"),))] == 1
    assert got[("zim_store_batch_operations_count", ())] == 1
    assert got[("zim_store_commit_seconds_bucket", (("le", "0.0025"),))] == 1
    assert got[("zim_store_commit_seconds_bucket", (("le", "0.001"),))] == 0
    assert got[("zim_redis_link_up", (("master", "10.0.0.1:6379"),))] == 1
    assert got[("zim_redis_call_seconds_count", ())] == 1

    workers[0]["accepted"] = 13                 # the sources are read again at the next scrape
    app_values[("zim_rate_limited_total", "channel")] = 1
    stats.record(700, 0.3)
    got = samples(client.get("/metrics").body)
    assert got[("zim_connections_accepted_total", ())] == 17
    assert got[("zim_rate_limited_total", (("scope", "channel"),))] == 1
    assert got[("zim_store_batch_operations_bucket", (("le", "500.0"),))] == 1
    assert got[("zim_store_batch_operations_bucket", (("le", "1000.0"),))] == 2
    assert got[("zim_store_batch_operations_sum", ())] == 703
    assert got[("zim_store_commit_seconds_bucket", (("le", "+Inf"),))] == 2
    assert loop.call(lambda: metrics.server.clients) == 1       # both on one connection
    client.close()
    stats.close()


def test_a_failing_source_loses_only_its_own_families(loop, metrics):
    def broken():
        raise RuntimeError("source bug")

    metrics.add_source(broken)
    metrics.add_source(lambda: core_families({"accepted": 1}))
    answer = RawClient(port_of(metrics)).get("/metrics")
    assert answer.status == 200
    assert samples(answer.body)[("zim_connections_accepted_total", ())] == 1


def test_healthz_and_readyz_follow_ready(loop):
    state = {"ready": False, "reason": "store writer down"}

    def ready():
        if state["ready"] is None:
            raise RuntimeError("check broke")
        return state["ready"], state["reason"]

    m = Metrics()
    loop.call(lambda: m.serve(loop.reactor, f"{HOST}:0", ready))
    try:
        client = RawClient(port_of(m))
        health = client.get("/healthz")
        assert (health.status, health.body) == (200, b"ok")
        answer = client.get("/readyz")
        assert (answer.status, answer.body) == (503, b"store writer down")
        assert answer.headers["content-type"].startswith("text/plain")
        state.update(ready=True, reason="")
        assert (client.get("/readyz").status, client.get("/readyz").body) == (200, b"ok")
        state.update(ready=False, reason="not listening")
        assert (client.get("/readyz").status, client.get("/readyz").body) == (503, b"not listening")
        state["ready"] = None
        answer = client.get("/readyz")
        assert answer.status == 503 and b"check broke" in answer.body
        assert client.get("/healthz").status == 200       # alive all along
    finally:
        loop.call(m.close)


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
    server = serve(lambda method, target: (200, [], b"fine"), max_request_size=4096)
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
    def handler(method, target):
        if target == "/boom":
            raise RuntimeError("handler bug")
        return 200, [("Content-Type", "text/plain")], b"fine"

    client = RawClient(port_of(serve(handler)))
    assert client.get("/boom").status == 500
    assert client.get("/").body == b"fine"


# -- flow control and bounds ----------------------------------------------------------------

BIG = bytes(range(256)) * (32 * 4096)      # 32 MiB: more than the kernel buffers of one connection


def test_a_client_that_does_not_read_a_large_answer_does_not_stall_the_loop(loop, serve):
    def handler(method, target):
        return (200, [], BIG) if target == "/big" else (200, [], b"small")

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
    server = serve(lambda method, target: (200, [], b"fine"), max_clients=2)
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
    server = serve(lambda method, target: (200, [], b"fine"), idle_timeout=30)
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
    server = serve(lambda method, target: (200, [], b"fine"), idle_timeout=1.0)
    loop.call(lambda: setattr(loop.reactor, "on_tick", server.tick))
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
    server = serve(lambda method, target: (200, [], b"fine"))
    port = port_of(server)
    client = RawClient(port)
    assert client.get("/").body == b"fine"
    loop.call(server.close)
    assert client.closed_by_server(2)
    with pytest.raises(ConnectionRefusedError):
        RawClient(port)
    loop.call(server.close)                     # idempotent
    assert loop.latency() < 1.0                 # the loop goes on without it


# -- a real Prometheus ---------------------------------------------------------------------

def test_a_real_prometheus_scrapes_the_values(loop, metrics, prometheus):
    values = {"accepted": 7, "connections_ws": 3, "closed_peer": 2}
    metrics.add_source(lambda: core_families(values))
    metrics.add_source(lambda: families_from_counts(APP_FAMILIES, {("zim_errors_total", "bad_request"): 4}))
    port = port_of(metrics)
    prom = prometheus([f"{HOST}:{port}"])
    assert prom.wait_for("zim_connections_accepted_total", lambda v: v == [7.0]) == [7.0]
    assert prom.wait_for('zim_connections{transport="ws"}') == [3.0]
    assert prom.wait_for('zim_connections_closed_total{reason="peer"}') == [2.0]
    assert prom.wait_for('zim_errors_total{code="bad_request"}') == [4.0]
    values["accepted"] = 9                      # a later scrape sees the new number
    assert prom.wait_for("zim_connections_accepted_total", lambda v: v == [9.0]) == [9.0]
    assert prom.wait_for('up{job="zim"}') == [1.0]
    [target] = prom.targets()
    assert target["health"] == "up" and target["lastError"] == ""
    assert target["scrapeUrl"] == f"http://{HOST}:{port}/metrics"
