"""A small blocking zim client over TCP or WebSocket, built on ``zim.client.codec``.

Every read has a deadline (``timeout`` seconds by default), so a server that
does not answer raises ``TimeoutError`` instead of hanging the caller. Pushes
(seq 0) that arrive while a request waits for its answer are kept in
``client.pushes``, oldest first. ``connect("tcp://...", compress=True)`` asks
for compressed packets at login and inflates them.
"""
from __future__ import annotations

import socket
import time

from zim.client.codec import (Body, DEFAULT_MAX_PACKET, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG, Packet,
                              ProtocolError, WsDecoder, check_ws_upgrade, decode_body, encode_body,
                              login_body, login_compress, new_ws_key, server_address, take_tcp_packet, tcp_packet,
                              ws_close, ws_frame, ws_message, ws_upgrade_request)
from zim.protocol import HEARTBEAT, LOGIN

DEFAULT_TIMEOUT = 5.0
READ_SIZE = 1 << 18


class Closed(ConnectionError):
    """The server closed the connection. ``code`` is the WebSocket close code (None
    on TCP, or when the server sent none); ``reset``: by a TCP reset."""

    def __init__(self, code: int | None = None, reason: str = "", reset: bool = False) -> None:
        super().__init__(f"connection closed (code={code}, reset={reset}) {reason}")
        self.code = code
        self.reason = reason
        self.reset = reset


class ZimError(Exception):
    """The server answered a request with an error (docs/protocol.md, "Errors")."""

    def __init__(self, action: int, code: str, message: str) -> None:
        super().__init__(f"action {action}: {code}: {message}")
        self.action = action
        self.code = code
        self.message = message


def receive(sock: socket.socket, deadline: float) -> bytes:
    """What the server sent next on ``sock`` (never empty), before ``deadline``
    (``time.monotonic()``); TimeoutError after it, Closed at EOF or on a reset."""
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise TimeoutError("nothing from the server in time")
    sock.settimeout(remaining)
    try:
        chunk = sock.recv(READ_SIZE)
    except socket.timeout:
        raise TimeoutError("nothing from the server in time") from None
    except ConnectionResetError:
        raise Closed(None, "reset", reset=True) from None
    if not chunk:
        raise Closed(None, "EOF")
    return chunk


class Client:
    """Requests and pushes; ``TcpClient`` and ``WsClient`` move the packets."""

    compress = False    # TCP: ask for compressed packets at login (TcpClient)

    def __init__(self, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.timeout = timeout
        self.pushes: list[tuple[int, dict]] = []
        self._responses: dict[int, list[tuple[int, dict]]] = {}
        self._seq = 0
        self.user_id: str | None = None
        self.token: str | None = None
        self.name: str | None = None

    # -- what a transport provides -------------------------------------------------
    def _send_packet(self, action: int, seq: int, payload: bytes) -> None:
        raise NotImplementedError

    def _recv_packet(self, deadline: float) -> Packet:
        """One server packet before ``deadline``; raises Closed or TimeoutError."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    # -- requests ------------------------------------------------------------------
    def next_seq(self) -> int:
        """1, 2, ... 32767, then 1 again (seq 0 is the server's pushes)."""
        self._seq = self._seq % 32767 + 1
        return self._seq

    def send(self, action: int, body: Body = None, seq: int | None = None) -> int:
        """Send a request without waiting; returns its seq."""
        if seq is None:
            seq = self.next_seq()
        self._send_packet(action, seq, encode_body(body))
        return seq

    def _pump(self, deadline: float) -> tuple[int, int, dict]:
        """Read one packet: a push goes to ``pushes``, an answer waits for its seq."""
        action, seq, raw = self._recv_packet(deadline)
        body = decode_body(raw)
        if seq == 0:
            self.pushes.append((action, body))
        else:
            self._responses.setdefault(seq, []).append((action, body))
        return action, seq, body

    def wait_response(self, seq: int, timeout: float | None = None) -> tuple[int, int, dict]:
        """The answer with this seq; pushes read meanwhile go to ``pushes``."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            waiting = self._responses.get(seq)
            if waiting:
                action, body = waiting.pop(0)
                if not waiting:
                    del self._responses[seq]
                return action, seq, body
            self._pump(deadline)

    def request(self, action: int, body: Body = None, seq: int | None = None,
                timeout: float | None = None) -> tuple[int, int, dict]:
        """Send a request and return (action, seq, body) of its answer."""
        seq = self.send(action, body, seq)
        return self.wait_response(seq, timeout)

    def call(self, action: int, body: Body = None, timeout: float | None = None) -> dict:
        """Request and return the answer's body (an error answer too)."""
        got_action, _, result = self.request(action, body, timeout=timeout)
        if got_action != action:
            raise ProtocolError(f"answer of action {got_action} to a request of action {action}")
        return result

    def ok(self, action: int, body: Body = None, timeout: float | None = None) -> dict:
        """Request and return the answer's body; ZimError if it is an error."""
        result = self.call(action, body, timeout)
        error = result.get("error")
        if error is not None:
            raise ZimError(action, str(error.get("code")), str(error.get("message")))
        return result

    def login(self, name: str | None = None, token: str | None = None, *, jwt: str | None = None) -> dict:
        """Action 1: a new user called ``name``, with ``token`` that user again, or with
        ``jwt`` (the application's) the user it names (``name`` None: keep its name);
        keeps ``user_id``, ``token``
        and ``name`` (a JWT login without one answers the user's)."""
        body = login_body(name, token, jwt)
        result = self.ok(LOGIN, login_compress(body) if self.compress else body)
        self.user_id, self.token, self.name = result["id"], result["token"], result.get("name", name)
        self.compressed = result.get("compress") == "deflate"    # the server agreed
        return result

    def sync(self) -> None:
        """A heartbeat round trip: everything the server queued before it has arrived."""
        self.ok(HEARTBEAT)

    # -- pushes --------------------------------------------------------------------
    def recv_push(self, timeout: float = 2.0) -> tuple[int, dict]:
        """The next push (action, body), oldest first; TimeoutError if none comes."""
        deadline = time.monotonic() + timeout
        while not self.pushes:
            self._pump(deadline)
        return self.pushes.pop(0)

    def recv_pushes(self, count: int, timeout: float = 5.0) -> list[tuple[int, dict]]:
        """The next ``count`` pushes, all within ``timeout``."""
        deadline = time.monotonic() + timeout
        return [self.recv_push(max(0.0, deadline - time.monotonic())) for _ in range(count)]

    def wait_closed(self, timeout: float = 5.0) -> Closed:
        """Read (keeping packets) until the server closes; returns the Closed info."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self._pump(deadline)
            except Closed as closed:
                return closed

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _SocketClient(Client):
    """A client on one TCP socket: ``sock`` and the bytes read but not yet decoded."""

    sock: socket.socket

    def __init__(self, host: str, port: int, timeout: float = DEFAULT_TIMEOUT, source: str | None = None) -> None:
        """``source``: the local address to connect from."""
        super().__init__(timeout)
        self.sock = socket.create_connection((host, port), timeout=timeout,
                                             source_address=(source, 0) if source else None)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def send_raw(self, data: bytes) -> None:
        """Bytes straight onto the connection."""
        self.sock.sendall(data)

    def _read(self, deadline: float) -> bytes:
        return receive(self.sock, deadline)

    def shutdown_write(self) -> None:
        """Half-close: the server reads EOF, answers still come."""
        self.sock.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


class TcpClient(_SocketClient):
    """zim over plain TCP (length-prefixed packets). ``compress``: ask for
    compressed packets at login (``"compress": "deflate"``) and inflate them."""

    max_packet = DEFAULT_MAX_PACKET     # a longer packet from the server is a ProtocolError

    def __init__(self, host: str, port: int, timeout: float = DEFAULT_TIMEOUT, source: str | None = None,
                 compress: bool = False) -> None:
        super().__init__(host, port, timeout, source)
        self._buf = bytearray()
        self.compress = compress

    def _send_packet(self, action: int, seq: int, payload: bytes) -> None:
        self.sock.sendall(tcp_packet(action, seq, payload))

    def _recv_packet(self, deadline: float) -> Packet:
        while True:
            packet = take_tcp_packet(self._buf, self.max_packet, self.compress)
            if packet is not None:
                return packet
            try:
                self._buf += self._read(deadline)
            except Closed:
                if self._buf:
                    raise ProtocolError(f"EOF inside a packet: {bytes(self._buf[:40])!r}") from None
                raise


class WsClient(_SocketClient):
    """zim over WebSocket: one binary message per packet. Answers the server's
    pings; a close frame from the server is answered and raises Closed."""

    def __init__(self, host: str, port: int, timeout: float = DEFAULT_TIMEOUT, path: str = "/",
                 source: str | None = None, max_packet: int = DEFAULT_MAX_PACKET) -> None:
        super().__init__(host, port, timeout, source)
        key = new_ws_key()
        self.sock.sendall(ws_upgrade_request(key, f"{host}:{port}", path))
        head = bytearray()
        deadline = time.monotonic() + timeout
        while b"\r\n\r\n" not in head:
            head += self._read(deadline)
        end = head.index(b"\r\n\r\n") + 4
        self.headers = check_ws_upgrade(bytes(head[:end]), key)
        self._decoder = WsDecoder(max_packet)
        self._events = self._decoder.feed(bytes(head[end:]))

    def _send_packet(self, action: int, seq: int, payload: bytes) -> None:
        self.send_raw(ws_message(action, seq, payload))

    def send_raw(self, data: bytes) -> None:
        """One binary message with exactly these bytes (action, seq, body)."""
        self.sock.sendall(ws_frame(OP_BINARY, data))

    def ping(self, payload: bytes = b"") -> None:
        self.sock.sendall(ws_frame(OP_PING, payload))

    def _recv_packet(self, deadline: float) -> Packet:
        while True:
            while self._events:
                event = self._events.pop(0)
                if event[0] == "packet":
                    return event[1:]
                if event[0] == "ping":
                    self.sock.sendall(ws_frame(OP_PONG, event[1]))
                elif event[0] == "close":
                    self._answer_close(event[1])
                    raise Closed(event[1], event[2])
            try:
                self._events = self._decoder.feed(self._read(deadline))
            except Closed:
                raise Closed(None, "no close frame") from None

    def _answer_close(self, code: int | None) -> None:
        try:
            self.sock.sendall(ws_close(code) if code else ws_frame(OP_CLOSE))
        except OSError:
            pass

    def close(self) -> None:
        """Send a close frame (1000), then close the socket."""
        self._answer_close(1000)
        super().close()


def connect(url: str, timeout: float = DEFAULT_TIMEOUT, source: str | None = None,
            compress: bool = False) -> TcpClient | WsClient:
    """A client connected to ``tcp://HOST:PORT`` or ``ws://HOST:PORT/PATH``;
    ``compress`` (TCP only: WebSocket has permessage-deflate) as ``TcpClient``."""
    scheme, host, port, path = server_address(url)
    if scheme == "tcp":
        return TcpClient(host, port, timeout, source, compress)
    if compress:
        raise ValueError("compress=True is for tcp:// (WebSocket compresses with permessage-deflate)")
    return WsClient(host, port, timeout, path, source)
