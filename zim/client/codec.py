"""zim's wire format from the client's side, without any I/O (docs/protocol.md).

- **Bodies**: a JSON object, UTF-8 (``encode_body``, ``decode_body``).
- **TCP**: every packet is ``length(4) action(2) seq(2) body``, big-endian, the
  length counting the whole packet (``tcp_packet``; ``split_tcp`` and
  ``TcpDecoder`` take whole packets out of the bytes read; ``tcp_header`` builds
  a head from any fields, unchecked, for tests and tools). A client that asked
  for compression at login (``login_compress``) gets packets with seq bit 15
  set whose body is raw DEFLATE: the splitters given ``inflate=True`` return
  them inflated, with the real seq (``inflate_body``).
- **WebSocket**: one binary message per packet carrying ``action(2) seq(2) body``
  (``ws_message``, read back by ``parse_ws_message``). A client masks its frames
  (``ws_frame``, ``ws_packet``, ``ws_close``; ``ws_header`` and
  ``ws_close_payload`` build unchecked parts, for tests and tools); the server's frames are unmasked (``parse_frame``,
  ``split_frames``, ``split_ws``, ``WsDecoder``). The opening handshake:
  ``new_ws_key``, ``ws_upgrade_request``, ``check_ws_upgrade``.

Packets come out as ``(action, seq, body)`` tuples with ``body`` the raw bytes:
decoding the JSON is the caller's choice (``decode_body``), since a bench or a
load generator often only needs the action. Bytes that break the framing raise
``ProtocolError`` (a ``ValueError``).

The splitters work in place on a ``bytearray`` the caller reads into, with
``struct.unpack_from`` and no per-byte Python loop: benches push hundreds of
thousands of packets a second through them.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import struct
import zlib
from typing import Any, Union
from urllib.parse import urlsplit

TCP_HEADER = struct.Struct(">IHH")      # length (the whole packet), action, seq
TCP_HEADER_SIZE = TCP_HEADER.size       # 8
PACKET_HEAD = struct.Struct(">HH")      # a WebSocket message's action, seq
PACKET_HEAD_SIZE = PACKET_HEAD.size     # 4
SEQ_DEFLATED = 0x8000                   # a server TCP packet's seq bit: its body is compressed
SEQ_MASK = 0x7FFF                       # ... and the real seq is the rest
# Far above anything a server sends (its packets stay under 1 MiB): a length
# over it is a broken stream, not a packet to wait for.
DEFAULT_MAX_PACKET = 1 << 24

WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"     # RFC 6455, 1.3
OP_CONTINUATION, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0, 1, 2, 8, 9, 10
CLOSE_NORMAL = 1000
_U16 = struct.Struct(">H")
_U64 = struct.Struct(">Q")

Body = Union[dict, bytes, bytearray, None]
Packet = tuple[int, int, bytes]         # action, seq, body


class ProtocolError(ValueError):
    """Bytes from the server that break zim's framing or the WebSocket protocol."""


# -- bodies ------------------------------------------------------------------------
def server_address(url: str) -> tuple[str, str, int, str]:
    """``tcp://HOST:PORT`` or ``ws://HOST:PORT/PATH`` -> (scheme, host, port, path);
    ValueError for anything else."""
    parts = urlsplit(url)
    if parts.scheme not in ("tcp", "ws") or parts.hostname is None or parts.port is None:
        raise ValueError(f"{url!r}: expected tcp://HOST:PORT or ws://HOST:PORT/PATH")
    return parts.scheme, parts.hostname, parts.port, parts.path or "/"


def login_body(name: str | None, token: str | None = None, jwt: str | None = None) -> dict[str, Any]:
    """Action 1's body: a new user called ``name``; with ``token`` that user again;
    with ``jwt`` (the application's) the user it names, and ``name`` None keeps
    the user's name (a token login needs one)."""
    body: dict[str, Any] = {} if name is None else {"name": name}
    if token is not None:
        body["token"] = token
    if jwt is not None:
        body["jwt"] = jwt
    return body


def login_compress(body: dict[str, Any]) -> dict[str, Any]:
    """Action 1's body asking for compressed packets on TCP (``"compress": "deflate"``)."""
    return {**body, "compress": "deflate"}


def encode_body(body: Body) -> bytes:
    """A dict as compact UTF-8 JSON; bytes pass through unchanged; None is an empty body."""
    if body is None:
        return b""
    if isinstance(body, (bytes, bytearray)):
        return bytes(body)
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()


def decode_body(raw: bytes) -> dict:
    """A server body: a UTF-8 JSON object (an empty body means ``{}``)."""
    if not raw:
        return {}
    try:
        value = json.loads(raw.decode("utf-8"))
    except ValueError as exc:           # bad UTF-8 or bad JSON
        raise ProtocolError(f"server body is not JSON ({exc}): {bytes(raw[:200])!r}") from None
    if not isinstance(value, dict):
        raise ProtocolError(f"server body is not a JSON object: {bytes(raw[:200])!r}")
    return value


# -- TCP ---------------------------------------------------------------------------
def tcp_packet(action: int, seq: int, body: Body = None) -> bytes:
    """One TCP packet: length(4, the whole packet) action(2) seq(2) body."""
    try:                # bytes, the benches' case, at no cost (bytes + dict is a TypeError)
        return TCP_HEADER.pack(TCP_HEADER_SIZE + len(body), action, seq) + body
    except TypeError:
        body = encode_body(body)
    return TCP_HEADER.pack(TCP_HEADER_SIZE + len(body), action, seq) + body


def tcp_header(length: int, action: int, seq: int) -> bytes:
    """A TCP packet head with exactly these fields and no checks: for tests and tools
    that send what a correct client never would (a length below 8 or far over the
    limit, a head without its body). ``action`` and ``seq`` are taken as 16 bits
    (-1 is 65535); ``length`` must fit in 32."""
    return TCP_HEADER.pack(length, action & 0xFFFF, seq & 0xFFFF)


def inflate_body(data: bytes, max_size: int = DEFAULT_MAX_PACKET) -> bytes:
    """The body of a compressed server packet (seq bit 15 set): one raw DEFLATE
    stream (RFC 1951) ending in its final block, inflated on its own (no context
    from earlier packets). ProtocolError if it is not exactly that, or inflates
    past ``max_size`` bytes (read no further than that: a zip bomb costs nothing)."""
    inflater = zlib.decompressobj(-15)
    try:
        body = inflater.decompress(data, max_size)
    except zlib.error as exc:
        raise ProtocolError(f"compressed body does not inflate: {exc}") from None
    if inflater.unconsumed_tail:
        raise ProtocolError(f"compressed body inflates past {max_size} bytes")
    if not inflater.eof or inflater.unused_data:
        raise ProtocolError("compressed body is not one whole deflate stream")
    return body


def split_tcp(buffer: bytearray, max_packet: int = DEFAULT_MAX_PACKET, inflate: bool = False) -> list[Packet]:
    """Remove every whole packet from the start of ``buffer``; (action, seq, body) each.

    What is left is the start of the next packet. A length below the 8-byte head
    or over ``max_packet`` raises ProtocolError (``buffer`` is then left as it was).
    ``inflate``: the client asked for compression, so a packet with seq bit 15 comes
    out inflated, its seq without that bit (a body that does not inflate: ProtocolError).
    """
    packets = []
    append = packets.append
    unpack = TCP_HEADER.unpack_from
    offset = 0
    size = len(buffer)
    while size - offset >= TCP_HEADER_SIZE:
        length, action, seq = unpack(buffer, offset)
        if length < TCP_HEADER_SIZE or length > max_packet:
            raise ProtocolError(f"server packet length {length} is not in 8..{max_packet}")
        if size - offset < length:
            break
        if inflate and seq & SEQ_DEFLATED:
            append((action, seq & SEQ_MASK, inflate_body(buffer[offset + TCP_HEADER_SIZE:offset + length],
                                                         max_packet)))
        else:
            append((action, seq, bytes(buffer[offset + TCP_HEADER_SIZE:offset + length])))
        offset += length
    del buffer[:offset]
    return packets


def take_tcp_packet(buffer: bytearray, max_packet: int = DEFAULT_MAX_PACKET,
                    inflate: bool = False) -> Packet | None:
    """Remove the first packet from ``buffer`` and return it, or None while it is
    incomplete (for a reader that wants one packet at a time). Errors and
    ``inflate`` as ``split_tcp``."""
    if len(buffer) < TCP_HEADER_SIZE:
        return None
    length, action, seq = TCP_HEADER.unpack_from(buffer)
    if length < TCP_HEADER_SIZE or length > max_packet:
        raise ProtocolError(f"server packet length {length} is not in 8..{max_packet}")
    if len(buffer) < length:
        return None
    body = bytes(buffer[TCP_HEADER_SIZE:length])
    if inflate and seq & SEQ_DEFLATED:
        body, seq = inflate_body(body, max_packet), seq & SEQ_MASK
    del buffer[:length]
    return action, seq, body


class TcpDecoder:
    """Incremental TCP decoding: ``feed(data)`` returns the packets completed by
    ``data``, as (action, seq, body); a partial packet waits for the next call.
    ``inflate``: compressed packets come out inflated (``split_tcp``)."""

    __slots__ = ("buffer", "max_packet", "inflate")

    def __init__(self, max_packet: int = DEFAULT_MAX_PACKET, inflate: bool = False) -> None:
        self.buffer = bytearray()
        self.max_packet = max_packet
        self.inflate = inflate

    def feed(self, data: bytes) -> list[Packet]:
        self.buffer += data
        return split_tcp(self.buffer, self.max_packet, self.inflate)


# -- WebSocket frames --------------------------------------------------------------
def ws_message(action: int, seq: int, body: Body = None) -> bytes:
    """The payload of one binary WebSocket message: action(2) seq(2) body."""
    try:
        return PACKET_HEAD.pack(action, seq) + body
    except TypeError:
        return PACKET_HEAD.pack(action, seq) + encode_body(body)


def parse_ws_message(message: bytes | bytearray) -> Packet:
    """(action, seq, body) of one binary WebSocket message (the inverse of
    ``ws_message``); ProtocolError if it is shorter than its 4-byte head."""
    if len(message) < PACKET_HEAD_SIZE:
        raise ProtocolError(f"message shorter than 4 bytes: {bytes(message)!r}")
    action, seq = PACKET_HEAD.unpack_from(message)
    return action, seq, bytes(message[PACKET_HEAD_SIZE:])


def apply_mask(payload: bytes, key: bytes) -> bytes:
    """``payload`` XOR the 4-byte ``key`` repeated (masking and unmasking are the same)."""
    size = len(payload)
    if not size:
        return b""
    # XOR through one big integer: no per-byte Python loop
    repeated = (key * (size // 4 + 1))[:size]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(repeated, "big")).to_bytes(size, "big")


_KEY_POOL_BYTES = 4096
_key_pool = b""
_key_offset = 0


def mask_key() -> bytes:
    """A fresh, unpredictable 4-byte masking key (RFC 6455, 5.3), cut from a pool
    of ``os.urandom`` bytes: one system call per 1,024 frames, not per frame."""
    global _key_pool, _key_offset
    if _key_offset >= len(_key_pool):
        _key_pool, _key_offset = os.urandom(_KEY_POOL_BYTES), 0
    _key_offset += 4
    return _key_pool[_key_offset - 4:_key_offset]


def ws_header(opcode: int, length: int, fin: bool = True, rsv: int = 0, mask: bool = True,
              length_bytes: int | None = None) -> bytes:
    """A frame's first bytes up to its masking key (not included), declaring
    ``length`` payload bytes, with no checks: for tests and tools that send what a
    correct client never would (a length with no payload behind it, a length with
    its top bit set, a non-minimal encoding forced by ``length_bytes`` 0, 2 or 8).
    ``mask=False`` clears the mask bit (a server's frame head)."""
    first = (0x80 if fin else 0) | (rsv & 7) << 4 | (opcode & 0x0F)
    return _frame_head(first, length, 0x80 if mask else 0, length_bytes)


def _frame_head(first: int, size: int, mask_bit: int, length_bytes: int | None = None) -> bytes:
    """A frame's first bytes up to its masking key: FIN/RSV/opcode, mask bit and length."""
    if length_bytes is None:
        length_bytes = 0 if size < 126 else 2 if size < 65536 else 8
    if length_bytes == 0:
        return bytes((first, mask_bit | size))
    if length_bytes == 2:
        return bytes((first, mask_bit | 126)) + _U16.pack(size)
    return bytes((first, mask_bit | 127)) + _U64.pack(size)


def ws_frame(opcode: int, payload: bytes = b"", fin: bool = True, mask: bool = True,
             rsv: int = 0, key: bytes | None = None, length_bytes: int | None = None) -> bytes:
    """One client frame, exactly as asked, masked with ``key`` (a fresh one by default).

    ``rsv`` is the 3 RSV bits (0..7). For testing a server, it also builds the
    frames a server must refuse: ``mask=False``, ``length_bytes`` forcing 0, 2 or
    8 extended length bytes (a non-minimal encoding when more than needed), a
    fragmented or oversized control frame.
    """
    head = ws_header(opcode, len(payload), fin, rsv, mask, length_bytes)
    if not mask:
        return head + payload
    if key is None:
        key = mask_key()
    return head + key + apply_mask(payload, key)


def ws_packet(action: int, seq: int, body: Body = None) -> bytes:
    """One masked binary frame carrying a packet (``action seq body``, no length)."""
    payload = ws_message(action, seq, body)
    key = mask_key()
    return _frame_head(0x82, len(payload), 0x80) + key + apply_mask(payload, key)


def ws_close(code: int = CLOSE_NORMAL, reason: str = "") -> bytes:
    """A masked close frame with ``code`` and a UTF-8 ``reason`` (at most 123 bytes)."""
    return ws_frame(OP_CLOSE, ws_close_payload(code, reason.encode()[:123]))


def ws_close_payload(code: int, reason: bytes = b"") -> bytes:
    """A close frame's payload: ``code`` (2 bytes) then ``reason`` as given, with no
    checks (tests send invalid codes and reasons that are not UTF-8); the inverse
    of ``close_payload``."""
    return _U16.pack(code) + reason


def _scan(buffer: bytes | bytearray, offset: int, most: int, as_packets: bool) -> tuple[list, int]:
    """The whole server frames from ``buffer[offset:]``, at most ``most`` (-1: all),
    and the offset past the last one: the one frame parser behind ``parse_frame``,
    ``split_frames`` and ``split_ws``, written for speed (see ``split_ws``)."""
    frames: list = []
    append = frames.append
    size = len(buffer)
    while most and size - offset >= 2:
        first, second = buffer[offset], buffer[offset + 1]
        if second & 0x80:
            raise ProtocolError("server frame is masked")
        length = second & 0x7F
        start = offset + 2
        if length == 126:
            if size - offset < 4:
                break
            length = _U16.unpack_from(buffer, start)[0]
            start += 2
            if length < 126:
                raise ProtocolError(f"server used a 16-bit length for {length} bytes")
        elif length == 127:
            if size - offset < 10:
                break
            length = _U64.unpack_from(buffer, start)[0]
            start += 8
            if not 65536 <= length < 1 << 63:
                raise ProtocolError(f"server 64-bit length {length} is invalid")
        if first & 0x08 and (length > 125 or not first & 0x80):
            raise ProtocolError(f"server control frame (opcode {first & 0x0F}) fragmented or over 125 bytes")
        end = start + length
        if end > size:
            break
        if not as_packets:
            append((bool(first & 0x80), (first >> 4) & 7, first & 0x0F, bytes(buffer[start:end])))
        elif first == 0x82 and length >= PACKET_HEAD_SIZE:      # FIN, no RSV, binary: a packet
            action, seq = PACKET_HEAD.unpack_from(buffer, start)
            append((OP_BINARY, action, seq, bytes(buffer[start + PACKET_HEAD_SIZE:end])))
        elif first & 0x70 or first & 0x8F == OP_BINARY:
            raise ProtocolError(f"server frame {first:#04x} is compressed, fragmented or too short: "
                                "use WsDecoder")
        else:
            append((first & 0x0F, 0, 0, bytes(buffer[start:end])))
        offset = end
        most -= 1
    return frames, offset


def parse_frame(buffer: bytes | bytearray, offset: int = 0) -> tuple[int, bool, int, int, bytes] | None:
    """The server frame at ``buffer[offset]``: (end, fin, rsv, opcode, payload), with
    ``end`` the offset just past it; None while it is incomplete.

    Raises ProtocolError for what a server must never send: a masked frame, a
    length not in its shortest encoding, a fragmented control frame or one over
    125 bytes.
    """
    frames, end = _scan(buffer, offset, 1, False)
    return (end, *frames[0]) if frames else None


def split_frames(buffer: bytearray) -> list[tuple[bool, int, int, bytes]]:
    """Remove every whole server frame from the start of ``buffer``; (fin, rsv,
    opcode, payload) each. Errors as ``parse_frame`` (``buffer`` is then left as it was)."""
    frames, end = _scan(buffer, 0, -1, False)
    del buffer[:end]
    return frames


def split_ws(buffer: bytearray) -> list[tuple[int, int, int, bytes]]:
    """Remove every whole server frame from ``buffer``: (opcode, action, seq, body)
    each, for clients that did not agree on compression: zim then sends each
    packet as one unfragmented binary frame. Other frames come as (opcode, 0, 0,
    payload). Errors as ``parse_frame``; a compressed, fragmented or too short
    binary frame is a ProtocolError too (``WsDecoder`` joins fragments).
    """
    frames, end = _scan(buffer, 0, -1, True)
    del buffer[:end]
    return frames


def close_payload(payload: bytes) -> tuple[int | None, str]:
    """(code, reason) of a close frame's payload (None, "") when it has none."""
    if not payload:
        return None, ""
    if len(payload) == 1:
        raise ProtocolError("close frame with a 1-byte payload")
    try:
        reason = payload[2:].decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError(f"close reason is not UTF-8: {payload[2:]!r}") from None
    return _U16.unpack_from(payload)[0], reason


class WsDecoder:
    """Incremental decoding of what a zim server sends on a WebSocket, after the
    handshake. ``feed(data)`` returns the events ``data`` completed, in order:

    - ``("packet", action, seq, body)``: a binary message (fragments joined);
    - ``("ping", payload)``, ``("pong", payload)``: control frames (a client
      answers a ping with ``ws_frame(OP_PONG, payload)``);
    - ``("close", code, reason)``: the server's close frame (code None without
      one); nothing is decoded after it.

    A text message, an RSV bit (this decoder does not agree on compression), a
    message over ``max_packet`` bytes (counted as a TCP packet, head included)
    or broken framing raises ProtocolError.
    """

    __slots__ = ("buffer", "max_packet", "_fragments", "_fragments_size", "closed")

    def __init__(self, max_packet: int = DEFAULT_MAX_PACKET) -> None:
        self.buffer = bytearray()
        self.max_packet = max_packet
        self._fragments: list[bytes] | None = None    # a message's frames so far
        self._fragments_size = 0
        self.closed = False

    def feed(self, data: bytes) -> list[tuple]:
        if self.closed:
            return []
        self.buffer += data
        events: list[tuple] = []
        for fin, rsv, opcode, payload in split_frames(self.buffer):
            if rsv:
                raise ProtocolError(f"server frame with RSV bits {rsv:03b} (no extension was agreed)")
            if opcode == OP_CLOSE:
                events.append(("close", *close_payload(payload)))
                self.closed = True
                self.buffer.clear()
                break
            if opcode == OP_PING or opcode == OP_PONG:
                events.append(("ping" if opcode == OP_PING else "pong", payload))
                continue
            message = self._gather(fin, opcode, payload)
            if message is not None:
                if len(message) < PACKET_HEAD_SIZE:
                    raise ProtocolError(f"server message shorter than 4 bytes: {message!r}")
                action, seq = PACKET_HEAD.unpack_from(message)
                events.append(("packet", action, seq, message[PACKET_HEAD_SIZE:]))
        return events

    def _gather(self, fin: bool, opcode: int, payload: bytes) -> bytes | None:
        """The whole message once its last frame came, else None."""
        if opcode == OP_CONTINUATION:
            if self._fragments is None:
                raise ProtocolError("continuation frame outside a fragmented message")
        elif self._fragments is not None:
            raise ProtocolError(f"frame of opcode {opcode} inside a fragmented message")
        elif opcode != OP_BINARY:
            raise ProtocolError(f"server sent a message of opcode {opcode} (zim sends binary ones)")
        else:
            self._fragments, self._fragments_size = [], 0
        self._fragments.append(payload)
        self._fragments_size += len(payload)
        if self._fragments_size + TCP_HEADER_SIZE - PACKET_HEAD_SIZE > self.max_packet:
            raise ProtocolError(f"server message of {self._fragments_size}+ bytes is over {self.max_packet}")
        if not fin:
            return None
        message = b"".join(self._fragments)
        self._fragments = None
        return message


# -- the opening handshake ---------------------------------------------------------
def new_ws_key() -> str:
    """A fresh Sec-WebSocket-Key: 16 random bytes in base64."""
    return base64.b64encode(os.urandom(16)).decode()


def ws_accept(key: str | bytes) -> str:
    """The Sec-WebSocket-Accept a server must answer to ``key``."""
    if isinstance(key, str):
        key = key.encode()
    return base64.b64encode(hashlib.sha1(key + WS_GUID).digest()).decode()


def ws_upgrade_request(key: str, host: str = "127.0.0.1", path: str = "/", extra: str = "") -> bytes:
    """The client's upgrade request; ``extra``: more header lines, each ending in CRLF
    (``"Origin: https://chat.example.com\\r\\n"``)."""
    return (f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            f"Sec-WebSocket-Version: 13\r\n{extra}\r\n").encode()


def parse_http_head(head: bytes) -> tuple[str, dict[str, str]]:
    """(status line, headers by lowercase name) of an HTTP response head (with or
    without its final blank line)."""
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    return lines[0], headers


def check_ws_upgrade(head: bytes, key: str | bytes) -> dict[str, str]:
    """The headers of the server's answer to an upgrade with ``key``; ProtocolError
    unless it is a 101 that upgrades to websocket with the right accept value."""
    status, headers = parse_http_head(head)
    if not status.startswith("HTTP/1.1 101"):
        raise ProtocolError(f"WebSocket upgrade refused: {status!r}")
    if headers.get("upgrade", "").lower() != "websocket" or "upgrade" not in headers.get("connection", "").lower():
        raise ProtocolError(f"WebSocket upgrade answer without Upgrade/Connection: {headers}")
    if headers.get("sec-websocket-accept") != ws_accept(key):
        raise ProtocolError(f"wrong Sec-WebSocket-Accept for the key {key!r}: {headers}")
    return headers


def ws_upgrade_accepted(head: bytes, key: str | bytes) -> bool:
    """Whether ``head`` accepts the upgrade made with ``key`` (``check_ws_upgrade``)."""
    try:
        check_ws_upgrade(head, key)
    except ProtocolError:
        return False
    return True
