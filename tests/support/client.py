"""The tests' zim clients: TCP and WebSocket, one interface, on ``zim.client``.

``TcpClient`` is zim.client's, with the checks of ``ZimClient``: every read has
a deadline, so a misbehaving server fails a test instead of hanging it; pushes
(seq 0) that arrive while waiting for a response are kept in
``client.pushes`` in arrival order; ``client.received`` logs every packet;
``ok``/``error`` assert what a request must get. ``WsClient`` talks through the
third-party ``websockets`` library, so the server's WebSocket side is checked
against an implementation that is not ours.

Also here: ``RawWs``, a hand-rolled WebSocket peer (zim.client's framing) for
the edge cases the library would refuse to produce, and the byte-level helpers
the tests use, from ``zim.client``.
"""
from __future__ import annotations

import socket
import time
import uuid
from typing import Any

from zim import client
from zim.client import (DEFAULT_TIMEOUT, Body, Closed, apply_mask, close_payload, decode_body,  # noqa: F401
                        encode_body, new_ws_key, parse_http_head, tcp_packet, ws_accept, ws_frame, ws_message,
                        ws_upgrade_request)
from zim.client import parse_frame as parse_server_frame  # noqa: F401
from zim.client.blocking import receive

SERVER_PACKET_LIMIT = 1 << 20   # docs/protocol.md: server packets stay under 1 MiB


def unique(prefix: str = "x") -> str:
    """A name no other test uses (servers are shared between tests)."""
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def error_code(body: dict) -> str | None:
    """The error code of a response body, None for a success body."""
    error = body.get("error") if isinstance(body, dict) else None
    if error is None:
        return None
    assert isinstance(error, dict), f"error is not an object: {body!r}"
    assert isinstance(error.get("code"), str), f"error.code is not a string: {body!r}"
    assert isinstance(error.get("message"), str), f"error.message is not a string: {body!r}"
    return error["code"]


class ZimClient(client.Client):
    """zim.client's request and push logic with the tests' checks; subclasses move
    packets over a transport."""

    kind = "?"

    def __init__(self, timeout: float = DEFAULT_TIMEOUT) -> None:
        super().__init__(timeout)
        self.received: list[tuple[int, int, dict]] = []

    def send_raw(self, data: bytes) -> None:
        raise NotImplementedError

    def _pump(self, deadline: float) -> tuple[int, int, dict]:
        packet = super()._pump(deadline)
        self.received.append(packet)
        return packet

    def ok(self, action: int, body: Body = None, timeout: float | None = None) -> dict:
        """Request that must succeed; returns the result body."""
        result = self.call(action, body, timeout)
        code = error_code(result)
        assert code is None, f"action {action} {body!r} failed: {result}"
        return result

    def error(self, action: int, body: Body = None, timeout: float | None = None) -> str:
        """Request that must fail; returns the error code."""
        result = self.call(action, body, timeout)
        code = error_code(result)
        assert code is not None, f"action {action} {body!r} succeeded unexpectedly: {result}"
        return code

    def assert_no_push(self, wait: float = 0.2) -> None:
        """No push arrived, none arrives within ``wait``."""
        self.sync()
        assert not self.pushes, f"unexpected pushes: {self.pushes[:3]}"
        try:
            push = self.recv_push(wait)
        except TimeoutError:
            return
        raise AssertionError(f"unexpected push: {push}")

    def login(self, name: str | None, token: str | None = None, *, jwt: str | None = None) -> dict:
        result = super().login(name, token, jwt=jwt)
        assert isinstance(result.get("id"), str) and result["id"], result
        assert isinstance(result.get("token"), str) and result["token"], result
        return result

    def __enter__(self) -> "ZimClient":
        return self


class TcpClient(client.TcpClient, ZimClient):
    """zim over plain TCP (length-prefixed packets): zim.client's TcpClient, checked."""

    kind = "tcp"

    @property
    def max_packet(self) -> int:
        """Read at each packet: a test may raise SERVER_PACKET_LIMIT (monkeypatch)."""
        return SERVER_PACKET_LIMIT - 1


class WsClient(ZimClient):
    """zim over WebSocket, via the third-party ``websockets`` library."""

    kind = "ws"

    def __init__(self, host: str, port: int, timeout: float = DEFAULT_TIMEOUT,
                 path: str = "/", compression: str | None = None) -> None:
        super().__init__(timeout)
        from websockets.sync.client import connect

        options: dict[str, Any] = dict(
            compression=compression,
            max_size=None,          # the size limit is checked here, against docs/protocol.md
            ping_interval=None,     # no pings unless a test sends them
            open_timeout=timeout,
            close_timeout=2,
            proxy=None,             # never through an HTTP proxy from the environment
        )
        try:
            connection = connect(f"ws://{host}:{port}{path}", **options)
        except TypeError:           # websockets < 15 has no proxy support (nor option)
            del options["proxy"]
            connection = connect(f"ws://{host}:{port}{path}", **options)
        # entered as a context manager (websockets >= 17.1 warns otherwise); close() ends it
        self.ws = connection.__enter__()

    def _send_packet(self, action: int, seq: int, payload: bytes) -> None:
        self.send_raw(ws_message(action, seq, payload))

    def send_raw(self, data: bytes) -> None:
        """One binary message with exactly these bytes (action, seq, body)."""
        from websockets.exceptions import ConnectionClosed

        try:
            self.ws.send(data)
        except ConnectionClosed as exc:
            raise Closed(exc.rcvd.code if exc.rcvd else None, "closed while sending") from None

    def send_text(self, text: str) -> None:
        self.ws.send(text)

    def ping(self, payload: bytes = b"") -> None:
        self.ws.ping(payload)

    def _recv_packet(self, deadline: float) -> tuple[int, int, bytes]:
        from websockets.exceptions import ConnectionClosed

        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("no message from the server in time")
        try:
            message = self.ws.recv(timeout=remaining)
        except ConnectionClosed as exc:
            raise Closed(exc.rcvd.code if exc.rcvd else None,
                         exc.rcvd.reason if exc.rcvd else "no close frame") from None
        assert isinstance(message, bytes), f"server sent a text message: {message[:100]!r}"
        assert len(message) >= 4, f"server message shorter than 4 bytes: {message!r}"
        assert len(message) + 4 < SERVER_PACKET_LIMIT, f"server packet of {len(message) + 4} bytes"
        return client.parse_ws_message(message)

    def close(self) -> None:
        try:
            self.ws.close()
        except Exception:
            pass


def connect(kind: str, host: str, port: int, timeout: float = DEFAULT_TIMEOUT, **kwargs: Any) -> ZimClient:
    return TcpClient(host, port, timeout) if kind == "tcp" else WsClient(host, port, timeout, **kwargs)


def login(client: ZimClient, name: str, token: str | None = None) -> dict:
    """Log ``client`` in; returns {"id", "token"}."""
    return client.login(name, token)


# ---------------------------------------------------------------------------
# Raw WebSocket, for frames the library would never send


class RawWs:
    """A WebSocket peer over a plain socket: hand-built frames, every server frame visible."""

    def __init__(self, host: str, port: int, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.timeout = timeout
        self.buf = bytearray()
        self.status: str = ""
        self.headers: dict[str, str] = {}
        self.key = ""

    @staticmethod
    def upgrade_request(key: str, path: str = "/", extra: str = "") -> bytes:
        return ws_upgrade_request(key, "127.0.0.1", path, extra)

    def handshake(self, path: str = "/", extra: str = "", then: bytes = b"") -> "RawWs":
        """Upgrade; asserts 101 and a correct Sec-WebSocket-Accept. ``then`` rides in the same write."""
        self.key = new_ws_key()
        self.sock.sendall(self.upgrade_request(self.key, path, extra) + then)
        status, headers = self.read_http_head()
        assert status.startswith("HTTP/1.1 101"), f"handshake refused: {status!r}"
        assert headers.get("upgrade", "").lower() == "websocket", headers
        assert "upgrade" in headers.get("connection", "").lower(), headers
        assert headers.get("sec-websocket-accept") == ws_accept(self.key), headers
        return self

    def read_http_head(self, timeout: float | None = None) -> tuple[str, dict[str, str]]:
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while b"\r\n\r\n" not in self.buf:
            self._recv_some(deadline)
        end = self.buf.index(b"\r\n\r\n") + 4
        self.status, self.headers = parse_http_head(bytes(self.buf[:end]))
        del self.buf[:end]
        return self.status, self.headers

    def _recv_some(self, deadline: float) -> None:
        self.buf += receive(self.sock, deadline)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send_frame(self, opcode: int, payload: bytes = b"", **kwargs: Any) -> None:
        self.sock.sendall(ws_frame(opcode, payload, **kwargs))

    def send_packet(self, action: int, seq: int, body: Body = None) -> None:
        self.send_frame(2, ws_message(action, seq, body))

    def read_frame(self, timeout: float | None = None) -> tuple[bool, int, int, bytes]:
        """(fin, rsv, opcode, payload) of the next server frame."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            parsed = parse_server_frame(self.buf)
            if parsed is not None:
                consumed, fin, rsv, opcode, payload = parsed
                del self.buf[:consumed]
                return fin, rsv, opcode, payload
            try:
                self._recv_some(deadline)
            except Closed:
                if self.buf:
                    raise AssertionError(f"EOF inside a server frame: {bytes(self.buf[:40])!r}")
                raise

    def read_packet(self, timeout: float | None = None) -> tuple[int, int, dict]:
        """The next binary message as (action, seq, body); other frames are an error."""
        fin, rsv, opcode, payload = self.read_frame(timeout)
        assert fin and opcode == 2 and rsv == 0, f"expected a binary message, got opcode {opcode} {payload[:60]!r}"
        action, seq, body = client.parse_ws_message(payload)
        return action, seq, decode_body(body)

    def read_close(self, timeout: float | None = None) -> tuple[int | None, list[tuple[int, bytes]]]:
        """Read until a close frame: (its code or None, frames seen before it).
        Then the server must end the TCP connection (EOF or reset)."""
        seen: list[tuple[int, bytes]] = []
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no close frame in time; frames meanwhile: {seen[:5]}")
            fin, rsv, opcode, payload = self.read_frame(remaining)
            if opcode == 8:
                return close_payload(payload)[0], seen
            seen.append((opcode, payload))

    def expect_eof(self, timeout: float = 5.0) -> bytes:
        """Bytes that arrive until the server closes the TCP connection."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self._recv_some(deadline)
            except Closed:
                rest = bytes(self.buf)
                self.buf.clear()
                return rest

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass
