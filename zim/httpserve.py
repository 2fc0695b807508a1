"""A small HTTP/1.1 server served by the reactor's loop, without a thread.

For ``--metrics`` (``zim.metrics``): a handful of GET endpoints, scraped every
few seconds by Prometheus or probed by an orchestrator; and for ``--api``
(``zim.api``): JSON requests with bodies (POST, DELETE ...) whose answers may
wait on the store. The parsing is h11's (sans-IO); the sockets are here:

- **One descriptor in the reactor**, as ``zim.nodes.link`` does for Redis: the
  listening socket and every client socket sit in an epoll set of this server's
  own (edge-triggered), and the reactor watches only that set's descriptor.
  Its callback accepts until EAGAIN, reads until EAGAIN, hands the bytes to h11
  and writes the answers; what the kernel does not take waits for EPOLLOUT.
- **One request at a time per connection.** Keep-alive and pipelining work,
  but the next request is parsed only once the previous answer has left, and
  while an answer waits for the client to read, its socket is not read either:
  a client that never reads costs one answer of memory, and never the loop.
  A handler may answer later (``Request.respond``, e.g. once the store has
  committed): the connection is not read meanwhile either.
- **Bounds.** At most ``max_clients`` connections (more are accepted and closed
  at once); a request head still incomplete after ``max_request_size`` bytes
  is answered 431 and closed (h11's ``max_incomplete_event_size``; a head that
  completes within one read of ``READ_SIZE`` may exceed it by that much, so
  memory stays bounded either way); a body over ``max_body_size`` bytes
  (``Content-Length``, or chunks as they come) is answered 413 and closed, so
  a body never holds more than that; a connection that
  completes no request and takes no bytes for ``idle_timeout`` seconds is
  closed by ``tick()``. A malformed request is answered 400 and closed.
- **Closing.** After a last answer (``Connection: close``, HTTP/1.0, an error),
  the write side is shut down and the input drained until EOF or ``LINGER``
  seconds, so the answer is not lost to a reset.

Everything runs on the loop: construct it before ``reactor.run()`` or from the
loop, and call ``tick()`` and ``close()`` from the loop (or once it has stopped).
"""
from __future__ import annotations

import errno
import itertools
import logging
import select
import socket
import time
from collections import deque
from http import HTTPStatus
from typing import Callable

import h11

from zim._core import Reactor

log = logging.getLogger("zim.http")

Headers = list[tuple[str, str]]
Answer = tuple[int, Headers, bytes]
Handler = Callable[["Request"], "Answer | None"]
ErrorAnswer = Callable[[int, str], tuple[Headers, bytes]]

DEFAULT_MAX_CLIENTS = 64
DEFAULT_MAX_REQUEST_SIZE = 16 * 1024
DEFAULT_IDLE_TIMEOUT = 30.0
LINGER = 5.0                # seconds a closing connection may take to send its EOF
READ_SIZE = 16 * 1024       # requests are small: reads bound what h11 may hold
METHODS = ("GET", "HEAD")
DEFAULT_MAX_BODY_SIZE = 0   # bytes of a request body (0: requests carry none)
_IOV_MAX = 64              # buffers per sendmsg (the kernel's limit is 1024)

_EVENTS = select.EPOLLIN | select.EPOLLOUT | select.EPOLLRDHUP | select.EPOLLET


def split_host_port(text: str) -> tuple[str, int]:
    """``"HOST:PORT"``, ``":PORT"`` (all interfaces) or ``"[V6]:PORT"`` -> (host, port);
    ValueError without a port in 0..65535 (0: any free port)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


def _reason(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""


def text_error(status: int, message: str) -> tuple[Headers, bytes]:
    """The server's own error answers (400, 405, 413, 500 ...) as plain text."""
    return [("Content-Type", "text/plain; charset=utf-8")], message.encode() + b"\n"


class Request:
    """One complete request as a handler sees it: ``method``, ``target`` (path
    and query as sent), ``headers`` (lower-case name -> value; a repeated
    header keeps its last value) and ``body`` (bytes, at most the server's
    ``max_body_size``). A handler that returns None answers later, once, with
    ``respond``; the connection waits for it (a client gone meanwhile makes it
    a no-op)."""

    __slots__ = ("method", "target", "headers", "body", "_server", "_client")

    def __init__(self, method: str, target: str, headers: dict[str, str], body: bytes,
                 server: "HttpServer", client: "_Client") -> None:
        self.method = method
        self.target = target
        self.headers = headers
        self.body = body
        self._server = server
        self._client = client

    @property
    def path(self) -> str:
        """The target without its query string."""
        return self.target.split("?", 1)[0]

    def respond(self, status: int, headers: Headers, body: bytes) -> None:
        """Answer a request whose handler returned None (from the loop)."""
        self._server._respond_later(self._client, self, status, headers, body)


class _Client:
    """One client connection: its socket, its h11 state and its unsent bytes."""

    __slots__ = ("sock", "fd", "h11", "out", "out_bytes", "last_active", "request",
                 "body", "body_bytes", "waiting", "closing", "lingering", "eof")

    def __init__(self, sock: socket.socket, max_request_size: int, now: float) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=max_request_size)
        self.out: deque[memoryview] = deque()      # unsent chunks, oldest first
        self.out_bytes = 0
        self.last_active = now      # accepted, a request completed, or the kernel took bytes
        self.request: h11.Request | None = None    # its head read, its body not yet
        self.body: list[bytes] = []                 # the body's chunks so far
        self.body_bytes = 0
        self.waiting: Request | None = None         # answered later: not read meanwhile
        self.closing = False        # no more requests: close once `out` has left
        self.lingering = False      # write side shut: draining input until EOF
        self.eof = False            # the client closed its side


def _declared_length(event: h11.Request) -> int:
    """The request's ``Content-Length`` (h11 has checked it is one number), else 0."""
    for name, value in event.headers:
        if name == b"content-length":
            return int(value)
    return 0


class HttpServer:
    """A non-blocking HTTP/1.1 server on ``reactor``'s loop; see the module docstring.

    ``handler(request)`` (a ``Request``) answers each request of one of
    ``methods`` with ``(status, headers, body)``, ``headers`` a list of
    ``(name, value)`` strings, or returns None and calls ``request.respond``
    later; the server adds ``Content-Length`` and, for HEAD, leaves the body
    out. Other methods get 405 without reaching the handler; a handler that
    raises gets its client a 500 (and a log entry). The server's own errors
    are shaped by ``error_answer(status, message) -> (headers, body)``
    (default: plain text). ``port`` 0 picks a free port: ``address`` says which.
    """

    def __init__(self, reactor: Reactor, host: str, port: int, handler: Handler, *,
                 max_clients: int = DEFAULT_MAX_CLIENTS,
                 max_request_size: int = DEFAULT_MAX_REQUEST_SIZE,
                 idle_timeout: float = DEFAULT_IDLE_TIMEOUT, backlog: int = 128,
                 methods: tuple[str, ...] = METHODS, max_body_size: int = DEFAULT_MAX_BODY_SIZE,
                 error_answer: ErrorAnswer = text_error) -> None:
        if max_clients < 1:
            raise ValueError("max_clients must be at least 1")
        self.reactor = reactor
        self.handler = handler
        self.methods = methods
        self.max_body_size = max_body_size
        self.error_answer = error_answer
        self.max_clients = max_clients
        self.max_request_size = max_request_size
        self.idle_timeout = idle_timeout
        self.refused = 0            # connections closed at once: max_clients were open
        self._clients: dict[int, _Client] = {}
        self._closed = False
        # every descriptor the set can hold, so one poll empties its ready list
        self._max_events = max_clients + 1
        self._poller = select.epoll()
        self._listener: socket.socket | None = None
        watched = False
        try:
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            listener = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
            self._listener = listener
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind((host, port))
            listener.listen(backlog)
            self.address: tuple[str, int] = listener.getsockname()[:2]
            self._poller.register(listener.fileno(), select.EPOLLIN | select.EPOLLET)
            reactor.watch(self._poller.fileno(), self._on_ready)
            watched = True
        except BaseException:
            if not watched:
                self._poller.close()
                if self._listener is not None:
                    self._listener.close()
                self._closed = True
            raise

    # -- public -------------------------------------------------------------------
    @property
    def clients(self) -> int:
        """Client connections open now (closing ones included)."""
        return len(self._clients)

    @property
    def queued_bytes(self) -> int:
        """Bytes of answers the clients have not taken yet, all connections together."""
        return sum(client.out_bytes for client in self._clients.values())

    def tick(self, now: float | None = None) -> None:
        """Close connections idle for ``idle_timeout`` seconds, and closing ones
        older than ``LINGER``; call it about once a second from the loop (the
        reactor's ``on_tick``). ``now``: a ``time.monotonic()`` reading."""
        if self._closed:
            return
        now = time.monotonic() if now is None else now
        for client in list(self._clients.values()):
            limit = LINGER if client.lingering else self.idle_timeout
            if now - client.last_active >= limit:
                log.debug("http client %d: closed after %.0f s idle", client.fd, now - client.last_active)
                self._drop(client)

    def close(self) -> None:
        """Stop listening, close every client connection, leave the reactor (idempotent)."""
        if self._closed:
            return
        self._closed = True
        for client in list(self._clients.values()):
            self._drop(client)
        self.reactor.unwatch(self._poller.fileno())
        self._poller.close()
        if self._listener is not None:
            self._listener.close()
            self._listener = None

    # -- the loop's callback ------------------------------------------------------------
    def _on_ready(self) -> None:
        """The set's descriptor is readable: the listener or some clients are ready."""
        if self._closed:
            return
        # Empties the set's ready list (edge-triggered items): every socket listed
        # is served until EAGAIN below, and a later event is a new wake-up.
        ready = self._poller.poll(0, self._max_events)
        listener_fd = self._listener.fileno()
        for fd, events in ready:
            if self._closed:        # a handler closed the server
                return
            if fd == listener_fd:
                self._accept()
                continue
            client = self._clients.get(fd)
            if client is None:
                continue
            try:
                self._serve(client, events)
            except Exception:
                # our bug or an h11 surprise: that client goes, the loop goes on
                log.exception("http client %d failed; closing it", fd)
                self._drop(client)

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self._listener.accept()
            except BlockingIOError:
                return
            except InterruptedError:
                continue
            except OSError as exc:
                if exc.errno in (errno.ECONNABORTED, errno.EPROTO):
                    continue
                # EMFILE and the like: the connection stays queued; the next one
                # to arrive (a new edge) tries again
                log.warning("http accept failed: %s", exc)
                return
            if len(self._clients) >= self.max_clients:
                self.refused += 1
                sock.close()
                continue
            try:
                sock.setblocking(False)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                # whatever it has sent already comes as the first edge
                self._poller.register(sock.fileno(), _EVENTS)
            except OSError as exc:
                log.warning("http client not served: %s", exc)
                sock.close()
                continue
            client = _Client(sock, self.max_request_size, time.monotonic())
            self._clients[client.fd] = client

    def _serve(self, client: _Client, events: int) -> None:
        if events & select.EPOLLERR:
            self._drop(client)
            return
        if client.out and not self._flush(client):
            return
        if client.lingering:
            self._drain(client)
            return
        if client.closing:
            self._finish(client)
            return
        # The answer that held the connection has left (or there was none): parse
        # what h11 holds, then read the socket until EAGAIN, answering as we go.
        self._answer(client)
        while not (client.out or client.closing or client.eof or client.waiting):
            try:
                data = client.sock.recv(READ_SIZE)
            except BlockingIOError:
                break
            except InterruptedError:
                continue
            except OSError:
                self._drop(client)
                return
            if not data:
                client.eof = True
            client.h11.receive_data(data)
            self._answer(client)
        if client.waiting:
            return                  # its answer resumes it (_respond_later)
        if client.closing and not client.out:
            self._finish(client)
        elif client.eof and not client.out:
            self._drop(client)

    def _answer(self, client: _Client) -> None:
        """Handle the requests h11 can parse, one at a time, while answers leave at once."""
        conn = client.h11
        while not (client.out or client.closing or client.waiting):
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                log.debug("http client %d: bad request: %s", client.fd, exc)
                self._error(client, exc.error_status_hint, "bad request")
                return
            if event is h11.NEED_DATA:
                return
            if event is h11.PAUSED:
                if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
                    conn.start_next_cycle()
                    continue
                client.closing = True       # one side wants to close (MUST_CLOSE)
                return
            kind = type(event)
            if kind is h11.Request:
                method = event.method.decode("ascii", "replace")
                if method not in self.methods:
                    # answered before its body, which is not read: so the connection ends
                    self._error(client, 405, "method not allowed", [("Allow", ", ".join(self.methods))])
                    return
                if _declared_length(event) > self.max_body_size:
                    self._error(client, 413, f"the body is over {self.max_body_size} bytes")
                    return
                client.request = event
            elif kind is h11.Data:
                client.body_bytes += len(event.data)
                if client.body_bytes > self.max_body_size:     # chunked: counted as it comes
                    self._error(client, 413, f"the body is over {self.max_body_size} bytes")
                    return
                client.body.append(event.data)
            elif kind is h11.EndOfMessage:
                request, client.request = client.request, None
                body, client.body, client.body_bytes = b"".join(client.body), [], 0
                client.last_active = time.monotonic()
                self._dispatch(client, request, body)
            elif kind is h11.ConnectionClosed:
                client.closing = True
                return

    def _dispatch(self, client: _Client, event: h11.Request, body: bytes) -> None:
        method = event.method.decode("ascii")
        target = event.target.decode("ascii", "replace")
        headers = {name.decode("ascii", "replace"): value.decode("latin-1") for name, value in event.headers}
        request = Request(method, target, headers, body, self, client)
        try:
            answer = self.handler(request)
        except Exception:
            log.exception("http handler failed for %s %s", method, target)
            self._error(client, 500, "internal error", close=False)
            return
        if answer is None:
            client.waiting = request
            return
        status, headers, body = answer
        self._respond(client, status, headers, body, head=method == "HEAD")

    def _respond_later(self, client: _Client, request: Request, status: int, headers: Headers,
                       body: bytes) -> None:
        """The late answer to ``request``: sent, then the connection is served again
        (what came meanwhile waits in the kernel or in h11: no new edge announces it)."""
        if client.waiting is not request or self._clients.get(client.fd) is not client:
            return                  # the client went, or answered already
        client.waiting = None
        client.last_active = time.monotonic()
        self._respond(client, status, headers, body, head=request.method == "HEAD")
        if self._clients.get(client.fd) is client:
            try:
                self._serve(client, 0)
            except Exception:
                log.exception("http client %d failed; closing it", client.fd)
                self._drop(client)

    def _error(self, client: _Client, status: int, message: str, headers: Headers = (), *,
               close: bool = True) -> None:
        """One of the server's own error answers (``error_answer``); by default the last."""
        fields, body = self.error_answer(status, message)
        self._respond(client, status, [*headers, *fields], body, close=close)

    def _respond(self, client: _Client, status: int, headers: Headers, body: bytes, *,
                 head: bool = False, close: bool = False) -> None:
        conn = client.h11
        fields = [(name, value) for name, value in headers if name.lower() != "content-length"]
        fields.append(("Content-Length", str(len(body))))
        if close:
            fields.append(("Connection", "close"))
        try:
            chunks = conn.send_with_data_passthrough(
                h11.Response(status_code=status, headers=fields, reason=_reason(status)))
            if body and not head:
                # passthrough: the body is queued as it is, not copied
                chunks += conn.send_with_data_passthrough(h11.Data(data=body))
            chunks += conn.send_with_data_passthrough(h11.EndOfMessage())
        except h11.LocalProtocolError as exc:
            # e.g. an error after a partial answer: nothing sane can follow
            log.debug("http client %d: cannot answer %d: %s", client.fd, status, exc)
            self._drop(client)
            return
        for chunk in chunks:
            if chunk:
                client.out.append(memoryview(chunk))
                client.out_bytes += len(chunk)
        if close or conn.our_state is h11.MUST_CLOSE:
            client.closing = True
        self._flush(client)

    def _flush(self, client: _Client) -> bool:
        """Send queued bytes until done (True) or EAGAIN (False: EPOLLOUT resumes)."""
        out = client.out
        sock = client.sock
        while out:
            try:
                # one gathered write for an answer's head and body: no copy, and
                # no small segment left waiting on a delayed ACK
                sent = sock.sendmsg(list(itertools.islice(out, _IOV_MAX)))
            except BlockingIOError:
                return False
            except InterruptedError:
                continue
            except OSError:
                self._drop(client)
                return False
            if sent:
                client.last_active = time.monotonic()
                client.out_bytes -= sent
            while sent:
                chunk = out[0]
                if sent >= len(chunk):
                    sent -= len(chunk)
                    out.popleft()
                else:
                    out[0] = chunk[sent:]
                    sent = 0
        return True

    def _finish(self, client: _Client) -> None:
        """The last answer has left: shut the write side, drain the input until EOF."""
        if client.eof:
            self._drop(client)
            return
        try:
            client.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._drop(client)
            return
        client.lingering = True
        client.last_active = time.monotonic()
        self._drain(client)

    def _drain(self, client: _Client) -> None:
        while True:
            try:
                data = client.sock.recv(READ_SIZE)
            except BlockingIOError:
                return
            except InterruptedError:
                continue
            except OSError:
                data = b""
            if not data:
                self._drop(client)
                return

    def _drop(self, client: _Client) -> None:
        client.closing = client.eof = True     # whatever loop holds it stops
        client.waiting = None
        client.body.clear()
        if self._clients.pop(client.fd, None) is None:
            return
        try:
            self._poller.unregister(client.fd)
        except (OSError, ValueError):
            pass
        client.sock.close()
        client.out.clear()
        client.out_bytes = 0
