"""What the HTTP tests (test_metrics_http.py, test_httpserve.py) share: a zim
Reactor running in a thread (``Loop``; ``loop.call(fn)`` runs fn on its loop
through an eventfd the reactor watches, the way a handler would run), the
fixtures ``loop``, ``serve`` and ``metrics`` on it, and a raw HTTP client.
"""
from __future__ import annotations

import os
import queue
import socket
import threading
import time
from typing import Any, Callable, Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from zim._core import Reactor
from zim.httpserve import HttpServer
from zim.metrics import Metrics

HOST = "127.0.0.1"


# -- the loop in a thread ----------------------------------------------------------------

class Loop:
    """A zim Reactor running in a thread; ``call(fn)`` runs fn on its loop, and
    ``ticks`` are called on the reactor's tick (once a second)."""

    def __init__(self) -> None:
        self.ticks: list[Callable[[], None]] = []
        self.reactor = Reactor(65536, lambda *packet: None, on_tick=self._tick)
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

    def _tick(self) -> None:
        for tick in self.ticks:
            tick()

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
