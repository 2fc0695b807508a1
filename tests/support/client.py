"""A small synchronous zim client for the tests: TCP and WebSocket, one interface.

Every read has a deadline, so a misbehaving server fails a test instead of
hanging it. Pushes (seq 0) that arrive while waiting for a response are kept
in ``client.pushes`` in arrival order; ``client.received`` logs every packet.

Also here: byte-level helpers (``tcp_packet``, ``ws_frame``) and ``RawWs``, a
hand-rolled WebSocket peer for the framing edge cases the library would refuse
to produce.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import socket
import struct
import time
import uuid
from typing import Any

DEFAULT_TIMEOUT = 5.0
SERVER_PACKET_LIMIT = 1 << 20   # docs/protocol.md: server packets stay under 1 MiB
WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

Body = dict | bytes | None


class Closed(Exception):
    """The server closed the connection. ``code`` is the WebSocket close code (None on TCP)."""

    def __init__(self, code: int | None = None, reason: str = "", reset: bool = False) -> None:
        super().__init__(f"connection closed (code={code}, reset={reset}) {reason}")
        self.code = code
        self.reason = reason
        self.reset = reset


def encode_body(body: Body) -> bytes:
    """dict -> compact UTF-8 JSON; bytes pass through unchanged; None -> empty body."""
    if body is None:
        return b""
    if isinstance(body, (bytes, bytearray)):
        return bytes(body)
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()


def decode_body(raw: bytes) -> dict:
    """A server body: UTF-8 JSON object (empty means {})."""
    if not raw:
        return {}
    value = json.loads(raw.decode("utf-8"))
    assert isinstance(value, dict), f"server body is not a JSON object: {raw[:200]!r}"
    return value


def unique(prefix: str = "x") -> str:
    """A name no other test uses (servers are shared between tests)."""
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def tcp_packet(action: int, seq: int, body: Body = None) -> bytes:
    """One TCP packet: length(4, whole packet) action(2) seq(2) body."""
    payload = encode_body(body)
    return struct.pack(">IHH", len(payload) + 8, action & 0xFFFF, seq & 0xFFFF) + payload


def ws_message(action: int, seq: int, body: Body = None) -> bytes:
    """The payload of one binary WebSocket message: action(2) seq(2) body."""
    return struct.pack(">HH", action & 0xFFFF, seq & 0xFFFF) + encode_body(body)


def error_code(body: dict) -> str | None:
    """The error code of a response body, None for a success body."""
    error = body.get("error") if isinstance(body, dict) else None
    if error is None:
        return None
    assert isinstance(error, dict), f"error is not an object: {body!r}"
    assert isinstance(error.get("code"), str), f"error.code is not a string: {body!r}"
    assert isinstance(error.get("message"), str), f"error.message is not a string: {body!r}"
    return error["code"]


class ZimClient:
    """Shared request/push logic; subclasses move packets over a transport."""

    kind = "?"

    def __init__(self, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.timeout = timeout
        self.pushes: list[tuple[int, dict]] = []
        self.received: list[tuple[int, int, dict]] = []
        self._responses: dict[int, list[tuple[int, dict]]] = {}
        self._seq = 0
        self.user_id: str | None = None
        self.token: str | None = None
        self.name: str | None = None

    # -- transport hooks --------------------------------------------------
    def _send_packet(self, action: int, seq: int, payload: bytes) -> None:
        raise NotImplementedError

    def _recv_packet(self, deadline: float) -> tuple[int, int, bytes]:
        """One server packet before deadline; raises Closed or TimeoutError."""
        raise NotImplementedError

    def send_raw(self, data: bytes) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    # -- requests ---------------------------------------------------------
    def next_seq(self) -> int:
        self._seq = self._seq % 32767 + 1
        return self._seq

    def send(self, action: int, body: Body = None, seq: int | None = None) -> int:
        """Send a request without waiting; returns its seq."""
        if seq is None:
            seq = self.next_seq()
        self._send_packet(action, seq, encode_body(body))
        return seq

    def _pump(self, deadline: float) -> tuple[int, int, dict]:
        action, seq, raw = self._recv_packet(deadline)
        body = decode_body(raw)
        self.received.append((action, seq, body))
        if seq == 0:
            self.pushes.append((action, body))
        else:
            self._responses.setdefault(seq, []).append((action, body))
        return action, seq, body

    def wait_response(self, seq: int, timeout: float | None = None) -> tuple[int, int, dict]:
        """The response with this seq; pushes read meanwhile go to ``pushes``."""
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
        """Send a request and return (action, seq, body) of its response."""
        seq = self.send(action, body, seq)
        return self.wait_response(seq, timeout)

    def call(self, action: int, body: Body = None, timeout: float | None = None) -> dict:
        """Request and return the response body; checks the echoed action."""
        got_action, _, result = self.request(action, body, timeout=timeout)
        assert got_action == action & 0xFFFF, f"response action {got_action} != request action {action}"
        return result

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

    # -- pushes -----------------------------------------------------------
    def recv_push(self, timeout: float = 2.0) -> tuple[int, dict]:
        """The next push (action, body), oldest first; TimeoutError if none comes."""
        deadline = time.monotonic() + timeout
        while not self.pushes:
            self._pump(deadline)
        return self.pushes.pop(0)

    def recv_pushes(self, count: int, timeout: float = 5.0) -> list[tuple[int, dict]]:
        deadline = time.monotonic() + timeout
        result = []
        for _ in range(count):
            result.append(self.recv_push(max(0.0, deadline - time.monotonic())))
        return result

    def sync(self) -> None:
        """A heartbeat round trip: everything the server queued before it has arrived."""
        self.ok(9)

    def assert_no_push(self, wait: float = 0.2) -> None:
        """No push arrived, none arrives within ``wait``."""
        self.sync()
        assert not self.pushes, f"unexpected pushes: {self.pushes[:3]}"
        try:
            push = self.recv_push(wait)
        except TimeoutError:
            return
        raise AssertionError(f"unexpected push: {push}")

    def wait_closed(self, timeout: float = 5.0) -> Closed:
        """Read (keeping packets) until the server closes; returns the Closed info."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self._pump(deadline)
            except Closed as closed:
                return closed

    # -- IM helpers -------------------------------------------------------
    def login(self, name: str, token: str | None = None) -> dict:
        body: dict[str, Any] = {"name": name}
        if token is not None:
            body["token"] = token
        result = self.ok(1, body)
        assert isinstance(result.get("id"), str) and result["id"], result
        assert isinstance(result.get("token"), str) and result["token"], result
        self.user_id, self.token, self.name = result["id"], result["token"], name
        return result

    def __enter__(self) -> "ZimClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class TcpClient(ZimClient):
    """zim over plain TCP (length-prefixed packets)."""

    kind = "tcp"

    def __init__(self, host: str, port: int, timeout: float = DEFAULT_TIMEOUT, source: str | None = None) -> None:
        """``source``: the local address to connect from (a loopback address: the
        server's per-address limits see one client per address)."""
        super().__init__(timeout)
        self.sock = socket.create_connection((host, port), timeout=timeout,
                                             source_address=(source, 0) if source else None)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._buf = bytearray()

    def _send_packet(self, action: int, seq: int, payload: bytes) -> None:
        self.send_raw(struct.pack(">IHH", len(payload) + 8, action & 0xFFFF, seq & 0xFFFF) + payload)

    def send_raw(self, data: bytes) -> None:
        """Bytes straight onto the stream."""
        self.sock.sendall(data)

    def _fill(self, need: int, deadline: float) -> None:
        while len(self._buf) < need:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("no complete packet from the server in time")
            self.sock.settimeout(remaining)
            try:
                chunk = self.sock.recv(1 << 18)
            except socket.timeout:
                raise TimeoutError("no complete packet from the server in time") from None
            except ConnectionResetError:
                raise Closed(None, "reset", reset=True) from None
            if not chunk:
                if self._buf:
                    raise AssertionError(f"EOF inside a packet: {bytes(self._buf[:40])!r}")
                raise Closed(None, "EOF")
            self._buf += chunk

    def _recv_packet(self, deadline: float) -> tuple[int, int, bytes]:
        self._fill(4, deadline)
        (length,) = struct.unpack_from(">I", self._buf)
        assert 8 <= length < SERVER_PACKET_LIMIT, f"bad server packet length {length}"
        self._fill(length, deadline)
        action, seq = struct.unpack_from(">HH", self._buf, 4)
        body = bytes(self._buf[8:length])
        del self._buf[:length]
        return action, seq, body

    def shutdown_write(self) -> None:
        self.sock.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


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
        self.send_raw(struct.pack(">HH", action & 0xFFFF, seq & 0xFFFF) + payload)

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
        action, seq = struct.unpack_from(">HH", message)
        return action, seq, message[4:]

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


def ws_frame(opcode: int, payload: bytes = b"", fin: bool = True, mask: bool = True,
             rsv: int = 0, key: bytes | None = None, length_bytes: int | None = None) -> bytes:
    """One frame. ``rsv`` is the 3 RSV bits (0..7); ``length_bytes`` forces 0, 2 or 8
    extended length bytes (a non-minimal encoding when too large)."""
    head = bytearray([(0x80 if fin else 0) | (rsv & 7) << 4 | (opcode & 0x0F)])
    n = len(payload)
    if length_bytes is None:
        length_bytes = 0 if n < 126 else 2 if n < 65536 else 8
    mask_bit = 0x80 if mask else 0
    if length_bytes == 0:
        head.append(mask_bit | n)
    elif length_bytes == 2:
        head.append(mask_bit | 126)
        head += struct.pack(">H", n)
    else:
        head.append(mask_bit | 127)
        head += struct.pack(">Q", n)
    if not mask:
        return bytes(head) + payload
    key = key if key is not None else os.urandom(4)
    return bytes(head) + key + apply_mask(payload, key)


def apply_mask(payload: bytes, key: bytes) -> bytes:
    if not payload:
        return b""
    repeated = (key * (len(payload) // 4 + 1))[: len(payload)]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(repeated, "big")).to_bytes(len(payload), "big")


def parse_server_frame(buf: bytes | bytearray) -> tuple[int, bool, int, int, bytes] | None:
    """(consumed, fin, rsv, opcode, payload) of the frame at buf[0], None if incomplete.
    Asserts the server did not mask it."""
    if len(buf) < 2:
        return None
    b0, b1 = buf[0], buf[1]
    assert not b1 & 0x80, "server frame is masked"
    n = b1 & 0x7F
    pos = 2
    if n == 126:
        if len(buf) < 4:
            return None
        n = struct.unpack_from(">H", buf, 2)[0]
        assert n >= 126, "server used a non-minimal 16-bit length"
        pos = 4
    elif n == 127:
        if len(buf) < 10:
            return None
        n = struct.unpack_from(">Q", buf, 2)[0]
        assert 65536 <= n < 1 << 63, f"server 64-bit length {n} is invalid"
        pos = 10
    if len(buf) < pos + n:
        return None
    return pos + n, bool(b0 & 0x80), (b0 >> 4) & 7, b0 & 0x0F, bytes(buf[pos:pos + n])


def ws_accept(key: str) -> str:
    return base64.b64encode(hashlib.sha1(key.encode() + WS_GUID).digest()).decode()


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
        return (f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                f"Sec-WebSocket-Version: 13\r\n{extra}\r\n").encode()

    def handshake(self, path: str = "/", extra: str = "", then: bytes = b"") -> "RawWs":
        """Upgrade; asserts 101 and a correct Sec-WebSocket-Accept. ``then`` rides in the same write."""
        self.key = base64.b64encode(os.urandom(16)).decode()
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
        head = bytes(self.buf[:end]).decode("latin-1")
        del self.buf[:end]
        lines = head.split("\r\n")
        headers = {}
        for line in lines[1:]:
            if ":" in line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        self.status, self.headers = lines[0], headers
        return lines[0], headers

    def _recv_some(self, deadline: float) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("nothing from the server in time")
        self.sock.settimeout(remaining)
        try:
            chunk = self.sock.recv(1 << 18)
        except socket.timeout:
            raise TimeoutError("nothing from the server in time") from None
        except ConnectionResetError:
            raise Closed(None, "reset", reset=True) from None
        if not chunk:
            raise Closed(None, "EOF")
        self.buf += chunk

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
        action, seq = struct.unpack_from(">HH", payload)
        return action, seq, decode_body(payload[4:])

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
                assert len(payload) != 1, "close frame with a 1-byte payload"
                code = struct.unpack_from(">H", payload)[0] if payload else None
                return code, seen
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
