"""What bench/fuzz.py's fuzzers send: the protocol's numbers, edge and
wrong-typed values, byte-wise mutation, and ``Gen``, which makes requests
(valid, with a wrong field, mutated), TCP packets and WebSocket frames that
break the framing, masked (and compressed) WebSocket messages, handshakes good
and bad, and zip bombs. The campaign itself is described in bench/fuzz.py.
"""
from __future__ import annotations

import base64
import random
import zlib

import orjson

from zim.client import (OP_BINARY, OP_CLOSE, OP_CONTINUATION as OP_CONT, OP_PING, OP_PONG, OP_TEXT,  # noqa: F401
                        apply_mask, tcp_header, ws_close_payload, ws_header, ws_message)
from zim.protocol import (  # noqa: F401  (the fuzzer's other modules take them from here)
    ACK, HEARTBEAT, HISTORY, LOGIN, PULL, SEND_CHANNEL, SEND_USER, SUBSCRIBE, UNSUBSCRIBE,
    PUSH_CHANNEL_BATCH as PUSH_BATCH, PUSH_CHANNEL_MESSAGE as PUSH_CHANNEL, PUSH_USER_MESSAGE as PUSH_USER,
)
TAIL = b"\x00\x00\xff\xff"
MIB = 1 << 20

FIELDS = {      # the fields of each action's request, optional ones too (9 has none: "x" is extra)
    LOGIN: ("name", "token"), SEND_USER: ("receiverId", "content"), SUBSCRIBE: ("name", "push"),
    SEND_CHANNEL: ("channel", "content"), HISTORY: ("channel", "userId", "beforeSeq", "limit"),
    UNSUBSCRIBE: ("name",), PULL: ("limit",), ACK: ("ids",), HEARTBEAT: ("x",),
}


def _raw(value) -> bytes:
    return orjson.dumps(value)


# Edge and wrong-typed values, as JSON text (some are not valid JSON on purpose).
WEIRD_VALUES: list[bytes] = [
    b"null", b"true", b"false", b"0", b"-1", b"1", b"101", b"1.5", b"-0.0", b"-0", b"1e2", b"1E+2",
    b"1e308", b"-1e308", b"1e-320", b"1e999", b"-1e999", b"NaN", b"Infinity", b"-Infinity",
    b"9223372036854775807", b"9223372036854775808", b"-9223372036854775808", b"-9223372036854775809",
    b"18446744073709551615", b"18446744073709551616", b"9" * 400, b"-" + b"9" * 400, b"0." + b"0" * 300 + b"1",
    b'""', b'" "', b'"\\u0000"', b'"\\ud800"', b'"\\udfff\\ud800"', b'"\\uDBFF\\uDFFF"', b'"\\u"',
    _raw("x" * 64), _raw("x" * 65), _raw("x" * 256), _raw("x" * 257), _raw("\u00e9" * 64), _raw("\u00e9" * 65),
    _raw("\U0001F600" * 70), b'"0"', b'"-1"', b'"1"', b'"18446744073709551616"', b'"1e3"', b'"00001"',
    b'" 1"', b'"1 "', b'"\\t"', b'"../../etc/passwd"', b'"<script>alert(1)</script>"', b'"%s%n%x"',
    b'"\'; DROP TABLE users; --"', b'"\\"\\\\\\/\\b\\f\\n\\r\\t"', b"[]", b"[1]", b'["1"]', b'[""]',
    b"[[]]", b"[null]", b'["1",2,null,{}]', b"{}", b'{"a":1}', b'{"":""}', b'{"name":{"name":{}}}',
    b"[" * 100 + b"]" * 100, b'{"a":' * 100 + b"1" + b"}" * 100, b"[" * 2000 + b"]" * 2000,
    b"[" * 3000, b"tru", b"nul", b"01", b"1.", b".5", b"+1", b"0x10", b"'x'", b'"unterminated',
    b'"\xff\xfe"', b'"\xc0\x80"', b'"\xed\xa0\x80"', b'"\xf4\x90\x80\x80"', b'"\xe2\x82"', b'"\x00"',
    b'"\x1f"', b"\xef\xbb\xbf1",
    _raw(["123"] * 200), _raw([str(n) for n in range(3000)]), _raw(list(range(100))),
]
BAD_UTF8 = [b"\xff", b"\xfe\xff", b"\xc0\x80", b"\xc1\xbf", b"\xed\xa0\x80", b"\xed\xbf\xbf",
            b"\xf4\x90\x80\x80", b"\xf8\x88\x80\x80\x80", b"\xe2\x82", b"\x80", b"\xbf\xbf", b"\xf0\x9f\x98"]
NON_OBJECTS = [b"[]", b"[1,2]", b'"s"', b"1", b"-1.5", b"null", b"true", b"false", b" ", b"\n\t ",
               b'""', b"{", b"}", b"{}}", b"{}{}", b'{"a":1}x', b'{"a":1,}', b"{'a':1}", b'{"a"}',
               b'{"a":}', b"{,}", b"\x00", b"\xef\xbb\xbf{}", b"{}\x00", b'{"a":1 /*c*/}', b"[{}]"]
INTERESTING_BYTES = b"\x00\x01\x7f\x80\xff\"\\{}[],:0-e.\n"
EDGE_ACTIONS = (0, 10, 11, 99, 100, 101, 102, 103, 104, 200, 255, 256, 1000, 32767, 32768, 32769, 65534, 65535)
EDGE_SEQS = (0, 1, 2, 255, 256, 32767, 32768, 32769, 65534, 65535)
CLOSE_CODES = (0, 1, 999, 1000, 1001, 1002, 1003, 1004, 1005, 1006, 1007, 1011, 1012, 1014, 1015, 1016,
               2000, 2999, 3000, 3999, 4000, 4999, 5000, 65535)
VALID_OFFERS = [
    "permessage-deflate", "permessage-deflate; client_max_window_bits",
    "permessage-deflate; client_max_window_bits=9; server_max_window_bits=10",
    "permessage-deflate; server_no_context_takeover; client_no_context_takeover",
    "permessage-deflate; server_max_window_bits=8", "x-webkit-deflate-frame, permessage-deflate",
]
BAD_OFFERS = [
    "permessage-deflate; server_max_window_bits=16", "permessage-deflate; server_max_window_bits=010",
    "permessage-deflate; server_max_window_bits=7", "permessage-deflate; client_max_window_bits=0",
    "permessage-deflate; server_no_context_takeover=1", "permessage-deflate; x", "permessage-deflate;",
    "permessage-deflate; ; ;", ";;;", ",,,", "permessage-deflate; server_max_window_bits",
    "permessage-deflate; client_max_window_bits; client_max_window_bits",
    'permessage-deflate; server_max_window_bits="10"', 'permessage-deflate; server_max_window_bits="1',
    "permessage-deflate; server_max_window_bits=10, permessage-deflate", "permessage-deflate " * 400,
    "permessage-deflate; " + "; ".join(["client_max_window_bits"] * 300), "\x00permessage-deflate",
    "permessage-deflate\x7f", "PERMESSAGE-DEFLATE", "permessage-deflate; server_max_window_bits=99999999999999",
]
TEXT = "hello, fuzz world "


def mutate(data: bytes, rng: random.Random, count: int) -> bytes:
    """Flip bits, replace, insert and delete bytes at random places."""
    b = bytearray(data)
    for _ in range(count):
        op = rng.random()
        if op < 0.35 and b:
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
        elif op < 0.55 and b:
            b[rng.randrange(len(b))] = rng.choice(INTERESTING_BYTES)
        elif op < 0.8:
            i = rng.randrange(len(b) + 1)
            b[i:i] = rng.randbytes(rng.choice((1, 1, 1, 2, 4, 8)))
        elif b:
            i = rng.randrange(len(b))
            del b[i:i + rng.choice((1, 1, 2, 4))]
    return bytes(b)


def body_of(fields: list[tuple[str, bytes]]) -> bytes:
    return b"{" + b",".join(b'"%s":%s' % (k.encode(), v) for k, v in fields) + b"}"


# -- the fuzzers' context -------------------------------------------------------------
class Pool:
    """What a fuzzer's requests refer to: its own users (tokens), the sink user that
    receives its private messages and never logs in, its channels."""

    def __init__(self, tokens: list[str], user_ids: list[str], sink_id: str, channels: list[str],
                 max_packet: int, ws_port: int, bombs: list[bytes]) -> None:
        self.tokens, self.user_ids, self.sink_id, self.channels = tokens, user_ids, sink_id, channels
        self.max_packet = max_packet
        self.max_body = max_packet - 8
        self.ws_port = ws_port
        self.bombs = bombs


class Gen:
    """Frames for one session; everything drawn from the session's own RNG."""

    def __init__(self, rng: random.Random, pool: Pool) -> None:
        self.rng = rng
        self.pool = pool

    # -- request bodies -------------------------------------------------------
    def template(self, action: int) -> list[tuple[str, bytes]]:
        rng, pool = self.rng, self.pool
        if action == LOGIN:
            fields = [("name", _raw(f"fz{rng.randrange(100)}"))]
            if rng.random() < 0.9:
                fields.append(("token", _raw(rng.choice(pool.tokens))))
            return fields
        if action == SEND_USER:
            target = pool.sink_id if rng.random() < 0.9 else rng.choice(pool.user_ids)
            return [("receiverId", _raw(target)), ("content", _raw(TEXT[:rng.randrange(1, 18)]))]
        if action == SUBSCRIBE:
            fields = [("name", _raw(rng.choice(pool.channels)))]
            if rng.random() < 0.9:
                fields.append(("push", b"false" if rng.random() < 0.9 else b"true"))
            return fields
        if action == SEND_CHANNEL:
            return [("channel", _raw(rng.choice(pool.channels))), ("content", _raw(TEXT[:rng.randrange(1, 18)]))]
        if action == HISTORY:
            if rng.random() < 0.5:
                fields = [("channel", _raw(rng.choice(pool.channels)))]
            else:
                fields = [("userId", _raw(pool.sink_id))]
            if rng.random() < 0.5:
                fields.append(("beforeSeq", _raw(rng.randrange(1, 1000))))
            if rng.random() < 0.7:
                fields.append(("limit", _raw(rng.randrange(1, 30))))
            return fields
        if action == UNSUBSCRIBE:
            return [("name", _raw(rng.choice(pool.channels)))]
        if action == PULL:
            return [("limit", _raw(rng.randrange(1, 20)))] if rng.random() < 0.7 else []
        if action == ACK:
            return [("ids", _raw([str(rng.getrandbits(62)) for _ in range(rng.randrange(0, 4))]))]
        return []

    def request(self) -> tuple[int, int, bytes, str]:
        """(action, seq, body, kind) of a request that does not break the framing
        (its packet stays within the size limit)."""
        rng = self.rng
        action = rng.randrange(1, 10)
        seq = rng.randrange(1, 32768)
        r = rng.random()
        if r < 0.15:
            kind, body = "valid", body_of(self.template(action))
        elif r < 0.40:
            kind, body = "wrong_field", self.wrong_field(action)
        elif r < 0.60:
            kind, body = "mutated_body", mutate(body_of(self.template(action)), rng, rng.choice((1, 1, 2, 3, 8)))
        elif r < 0.68:
            kind = "edge_header"
            action = rng.choice(EDGE_ACTIONS) if rng.random() < 0.5 else action
            seq = rng.choice(EDGE_SEQS)
            body = body_of(self.template(action if 1 <= action <= 9 else rng.randrange(1, 10)))
        elif r < 0.72:
            kind, action = "unknown_action", rng.choice((0, rng.randrange(10, 65536)))
            body = body_of(self.template(rng.randrange(1, 10))) if rng.random() < 0.5 else b"{}"
        elif r < 0.77:
            kind = "bad_utf8"
            body = bytearray(body_of(self.template(action)))
            body[rng.randrange(len(body) + 1):0] = rng.choice(BAD_UTF8)
            body = bytes(body)
        elif r < 0.82:
            kind, body = "non_object", rng.choice(NON_OBJECTS)
        elif r < 0.85:
            kind, body = "deep", self.deep()
        elif r < 0.89:
            kind = "huge_number"
            digits = b"9" * rng.choice((20, 21, 39, 40, 309, 310, 1000, 5000, 30000))
            number = rng.choice((digits, b"-" + digits, b"1e" + digits[:6], b"0." + digits, digits + b"e-99999"))
            fields = self.template(action)
            fields.append((rng.choice(FIELDS[action]), number))
            body = body_of(fields)
        elif r < 0.97:
            kind, body = "random_body", rng.randbytes(rng.choice((0, 1, 2, 7, 16, 100, 1000, 4000)))
        else:
            kind, body = "big_body", self.big_body(action)
        if len(body) > self.pool.max_body:
            body = body[:self.pool.max_body]
        return action, seq, body, kind

    def wrong_field(self, action: int) -> bytes:
        rng = self.rng
        fields = self.template(action)
        name = rng.choice(FIELDS[action])
        fields = [f for f in fields if f[0] != name]
        if rng.random() < 0.9:
            fields.append((name, rng.choice(WEIRD_VALUES)))
        if rng.random() < 0.1:      # the same key twice
            fields.append((name, rng.choice(WEIRD_VALUES)))
        if rng.random() < 0.2:
            rng.shuffle(fields)
        return body_of(fields)

    def deep(self) -> bytes:
        rng = self.rng
        depth = rng.choice((100, 1000, 1023, 1024, 1025, 5000, 20000, min(30000, self.pool.max_body // 2 - 16)))
        kind = rng.randrange(4)
        if kind == 0:
            return b"[" * depth + b"]" * depth
        if kind == 1:
            return b'{"a":' * depth + b"1" + b"}" * depth
        if kind == 2:
            return b'{"name":' + b"[" * depth + b"]" * depth + b"}"
        return b'{"ids":' + b"[" * depth          # unbalanced

    def big_body(self, action: int) -> bytes:
        """A body that makes the packet exactly the size limit (or a little under)."""
        rng = self.rng
        size = self.pool.max_body - rng.choice((0, 0, 1, 2, 100))
        fields = self.template(action)
        key = rng.choice(FIELDS[action])
        fields = [f for f in fields if f[0] != key]
        head = body_of(fields + [(key, b'""')])
        pad = max(0, size - len(head))
        filler = rng.choice((b"x", b"\\u00e9", b"\\\\"))
        text = (filler * (pad // len(filler) + 1))[:pad]
        return head[:-3] + b'"' + text + b'"}' if len(head) >= 3 else head

    def sweep(self) -> list[tuple[int, int, bytes]]:
        """Every field of every action set to every weird value, once (and removed)."""
        out = []
        seq = 1
        for action, names in FIELDS.items():
            for name in names:
                for value in [*WEIRD_VALUES, None]:
                    fields = [f for f in self.template(action) if f[0] != name]
                    if value is not None:
                        fields.append((name, value))
                    body = body_of(fields)
                    if len(body) <= self.pool.max_body:
                        out.append((action, seq, body))
                    seq = seq % 32767 + 1
        return out

    # -- TCP ------------------------------------------------------------------
    @staticmethod
    def tcp(action: int, seq: int, body: bytes) -> bytes:
        return tcp_header(8 + len(body), action, seq) + body      # any action and seq, as 16 bits

    def login_body(self) -> bytes:
        return body_of([("name", _raw("fz")), ("token", _raw(self.rng.choice(self.pool.tokens)))])

    def tcp_breaking(self) -> tuple[bytes, str]:
        """A packet that is likely to break the stream (it ends a session)."""
        rng = self.rng
        action, seq, body, _ = self.request()
        packet = self.tcp(action, seq, body)
        r = rng.randrange(12)
        k = rng.choice((1, 2, 3, 4, 7, 8, 16, 100, 1000))
        if r == 0:
            return tcp_header(max(8, len(packet) - k), action, seq) + body, "tcp_length_minus"
        if r == 1:
            return tcp_header(len(packet) + k, action, seq) + body, "tcp_length_plus"
        if r == 2:
            length = rng.choice((self.pool.max_packet + 1, 1 << 16 | 1, 1 << 24, 0x7FFFFFFF, 0x80000000,
                                 0xFFFFFFFF, rng.randrange(self.pool.max_packet + 1, 1 << 32)))
            return tcp_header(length, action, seq) + body[:rng.choice((0, 10, 1000))], "tcp_huge_length"
        if r == 3:
            return tcp_header(rng.randrange(8), action, seq) + body, "tcp_tiny_length"
        if r == 4:
            return packet[:rng.randrange(1, len(packet))], "tcp_truncated"
        if r == 5:
            return packet + rng.randbytes(rng.choice((1, 3, 8, 100, 5000))), "tcp_garbage_after"
        if r == 6:
            return mutate(packet[:8], rng, rng.randrange(1, 4)) + packet[8:], "tcp_mutated_header"
        if r == 7:
            return mutate(packet, rng, rng.randrange(1, 10)), "tcp_mutated_packet"
        if r == 8:
            over = self.pool.max_body + rng.choice((1, 2, 100, 5000))
            return self.tcp(action, seq, b'{"content":"' + b"x" * (over - 14) + b'"}'), "tcp_over_limit"
        if r == 9:
            return rng.randbytes(rng.choice((1, 4, 7, 8, 9, 100, 5000))), "tcp_random_bytes"
        if r == 10:
            return (b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: fuzz\r\n\r\n", "tcp_http_request")
        return self.handshake_bytes(offer=None), "tcp_ws_upgrade"

    # -- WebSocket --------------------------------------------------------------
    def mask(self) -> bytes:
        r = self.rng.random()
        return b"\0\0\0\0" if r < 0.2 else self.rng.randbytes(4)

    def ws(self, opcode: int, payload: bytes, fin: bool = True, rsv: int = 0, mask: bool = True,
           length: int | None = None, encoding: int | None = None) -> bytes:
        """A client frame as asked: ``length`` declares another size than the
        payload's, ``encoding`` 0, 1, 2 forces a 7-, 16- or 64-bit length."""
        size = len(payload) if length is None else length
        head = ws_header(opcode, size, fin, rsv, mask, None if encoding is None else (0, 2, 8)[encoding])
        if not mask:
            return head + payload
        key = self.mask()
        return head + key + apply_mask(payload, key)

    def deflate(self, payload: bytes) -> bytes:
        rng = self.rng
        compressor = zlib.compressobj(rng.choice((0, 1, 6, 9)), zlib.DEFLATED, -rng.choice((9, 12, 15)),
                                      rng.choice((1, 8, 9)))
        data = compressor.compress(payload) + compressor.flush(zlib.Z_SYNC_FLUSH)
        return data[:-4] if data.endswith(TAIL) else data

    def ws_message(self, payload: bytes, deflate: bool) -> tuple[list[bytes], str]:
        """One binary message: a single frame or fragments, compressed or not, with
        control frames between the fragments."""
        rng = self.rng
        compressed = deflate and rng.random() < 0.6
        data = self.deflate(payload) if compressed else payload
        rsv = 4 if compressed else 0
        if rng.random() < 0.8 or len(data) < 2:
            return [self.ws(OP_BINARY, data, rsv=rsv)], ("ws_deflated" if compressed else "ws_message")
        pieces = rng.randrange(2, 6)
        cuts = sorted(rng.randrange(len(data) + 1) for _ in range(pieces - 1))
        parts = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)])]
        frames = []
        for i, part in enumerate(parts):
            frames.append(self.ws(OP_BINARY if i == 0 else OP_CONT, part, fin=i == len(parts) - 1,
                                  rsv=rsv if i == 0 else 0))
            if i < len(parts) - 1 and rng.random() < 0.5:
                frames.append(self.ws(rng.choice((OP_PING, OP_PONG)), rng.randbytes(rng.randrange(0, 126))))
        return frames, ("ws_fragmented_deflated" if compressed else "ws_fragmented")

    def ws_stream_frames(self, deflate: bool) -> tuple[list[bytes], str]:
        rng = self.rng
        r = rng.random()
        if r < 0.8:
            action, seq, body, kind = self.request()
            frames, how = self.ws_message(ws_message(action & 0xFFFF, seq & 0xFFFF, body), deflate)
            return frames, f"{how}:{kind}"
        if r < 0.9:
            return [self.ws(OP_PING, rng.randbytes(rng.choice((0, 1, 4, 125))))], "ws_ping"
        if r < 0.95:
            return [self.ws(OP_PONG, rng.randbytes(rng.choice((0, 3, 125))))], "ws_pong"
        if r < 0.96:        # a mutated frame in the middle of the stream (may break it)
            action, seq, body, _ = self.request()
            frame = self.ws(OP_BINARY, ws_message(action & 0xFFFF, seq & 0xFFFF, body))
            return [mutate(frame, rng, rng.randrange(1, 4))], "ws_mutated_frame"
        # a message whose payload is split with empty continuations
        action, seq, body, _ = self.request()
        payload = ws_message(action & 0xFFFF, seq & 0xFFFF, body)
        return [self.ws(OP_BINARY, payload, fin=False), self.ws(OP_CONT, b"", fin=False),
                self.ws(OP_CONT, b"", fin=True)], "ws_empty_continuations"

    def ws_breaking(self, deflate: bool) -> tuple[bytes, str]:
        """A frame (or a few) likely to end the connection."""
        rng = self.rng
        action, seq, body, _ = self.request()
        payload = ws_message(action & 0xFFFF, seq & 0xFFFF, body)
        r = rng.randrange(22)
        if r == 0:
            return self.ws(OP_BINARY, payload, mask=False), "ws_unmasked"
        if r == 1:
            return self.ws(rng.choice((3, 4, 5, 6, 7, 0xB, 0xC, 0xD, 0xE, 0xF)), payload), "ws_reserved_opcode"
        if r == 2:
            return self.ws(OP_BINARY, payload, rsv=rng.choice((1, 2, 3, 5, 6, 7))), "ws_rsv23"
        if r == 3:
            if not deflate:
                return self.ws(OP_BINARY, payload, rsv=4), "ws_rsv1_without_deflate"
            return self.ws(rng.choice((OP_PING, OP_PONG, OP_CLOSE)), b"", rsv=4), "ws_rsv1_on_control"
        if r == 4:
            return self.ws(OP_CONT, payload), "ws_orphan_continuation"
        if r == 5:
            first = self.ws(OP_BINARY, payload[:2], fin=False, rsv=4 if deflate and rng.random() < 0.5 else 0)
            if rng.random() < 0.5:
                return first + self.ws(OP_CONT, payload[2:], rsv=4), "ws_rsv1_continuation"
            return first + self.ws(OP_BINARY, payload), "ws_message_inside_fragmented"
        if r == 6:
            return self.ws(rng.choice((OP_PING, OP_PONG, OP_CLOSE)), rng.randbytes(rng.choice((126, 200, 1000)))), \
                "ws_control_oversize"
        if r == 7:
            return self.ws(rng.choice((OP_PING, OP_PONG)), b"abc", fin=False), "ws_control_fragmented"
        if r == 8:
            text = rng.choice((b"hello", b"\xff\xfe", "\u00e9".encode(), b"\xed\xa0\x80"))
            return self.ws(OP_TEXT, text), "ws_text"
        if r == 9:
            reason = rng.choice((b"", b"bye", b"\xff\xfe", b"\xc0\x80", b"\xed\xa0\x80", b"x" * 123))
            return self.ws(OP_CLOSE, ws_close_payload(rng.choice(CLOSE_CODES), reason)), "ws_close_code"
        if r == 10:
            return self.ws(OP_CLOSE, rng.randbytes(1)), "ws_close_one_byte"
        if r == 11:
            length = rng.choice((1 << 63, (1 << 64) - 1, 1 << 32, self.pool.max_packet + 1, 5, 200))
            head = self.ws(OP_BINARY, b"", length=length, encoding=2)
            return head + rng.randbytes(rng.choice((0, 4, 100))), "ws_64bit_length"
        if r == 12:
            return self.ws(OP_BINARY, payload[:rng.choice((126, 200))] if len(payload) >= 126 else payload,
                           encoding=rng.choice((1, 2))), "ws_nonminimal_length"
        if r == 13:
            return self.ws(OP_BINARY, payload[:rng.randrange(4)]), "ws_under_4_bytes"
        if r == 14:
            over = payload + b"x" * (self.pool.max_packet - len(payload) + rng.choice((-3, 1, 100)))
            if rng.random() < 0.5:
                return self.ws(OP_BINARY, over), "ws_over_limit"
            half = len(over) // 2
            return self.ws(OP_BINARY, over[:half], fin=False) + self.ws(OP_CONT, over[half:]), \
                "ws_over_limit_fragmented"
        if r == 15 and deflate:
            data = self.deflate(payload)
            choice = rng.randrange(3)
            if choice == 0:
                data = rng.randbytes(rng.choice((1, 5, 50, 500)))
            elif choice == 1:
                data = mutate(data, rng, rng.randrange(1, 6))
            else:
                data = data[:rng.randrange(len(data))]
            return self.ws(OP_BINARY, data, rsv=4), "ws_corrupt_deflate"
        if r == 16 and deflate:
            bomb = rng.choice(self.pool.bombs)
            if rng.random() < 0.3:
                half = len(bomb) // 2
                return self.ws(OP_BINARY, bomb[:half], fin=False, rsv=4) + self.ws(OP_CONT, bomb[half:]), \
                    "ws_zip_bomb_fragmented"
            return self.ws(OP_BINARY, bomb, rsv=4), "ws_zip_bomb"
        if r == 17 and deflate:
            shared = zlib.compressobj(6, zlib.DEFLATED, -15)
            first = shared.compress(payload) + shared.flush(zlib.Z_SYNC_FLUSH)
            second = shared.compress(payload) + shared.flush(zlib.Z_SYNC_FLUSH)
            return self.ws(OP_BINARY, first[:-4], rsv=4) + self.ws(OP_BINARY, second[:-4], rsv=4), \
                "ws_context_takeover"
        if r == 18:
            return self.ws(OP_BINARY, payload, rsv=4), "ws_rsv1_unagreed" if not deflate else "ws_rsv1_plain"
        return mutate(self.ws(OP_BINARY, payload), rng, rng.randrange(1, 8)), "ws_mutated_frame"

    # -- handshakes ---------------------------------------------------------------
    def handshake_headers(self, offer: str | None) -> tuple[str, list[tuple[str, str]]]:
        key = base64.b64encode(self.rng.randbytes(16)).decode()
        headers = [("Host", f"127.0.0.1:{self.pool.ws_port}"), ("Upgrade", "websocket"),
                   ("Connection", "Upgrade"), ("Sec-WebSocket-Key", key), ("Sec-WebSocket-Version", "13")]
        if offer is not None:
            headers.append(("Sec-WebSocket-Extensions", offer))
        return "GET /fuzz HTTP/1.1", headers

    @staticmethod
    def head_bytes(line: str, headers: list[tuple[str, str]]) -> bytes:
        text = line + "\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers) + "\r\n"
        return text.encode("latin-1", "replace")

    def handshake_bytes(self, offer: str | None) -> bytes:
        return self.head_bytes(*self.handshake_headers(offer))

    def bad_handshake(self) -> tuple[bytes, str, bool]:
        """(bytes, kind, complete): a broken, odd or partial upgrade request."""
        rng = self.rng
        line, headers = self.handshake_headers(rng.choice(VALID_OFFERS) if rng.random() < 0.3 else None)
        r = rng.randrange(20)
        if r == 0:
            del headers[rng.randrange(1, len(headers))]
            kind = "hs_missing_header"
        elif r == 1:
            index = rng.randrange(1, 5)
            name = headers[index][0]
            values = {"Upgrade": ["h2c", "websocket2", "", "web socket"],
                      "Connection": ["keep-alive", "close", "", "Upgradeish", "keep-alive, upgrade"],
                      "Sec-WebSocket-Key": ["", "not base64!", base64.b64encode(b"x" * 15).decode(),
                                            base64.b64encode(b"x" * 17).decode(), "====", "A" * 5000,
                                            "dGhlIHNhbXBsZSBub25jZQ==\x00", "dGhlIHNhbXBsZSBub25jZQ"],
                      "Sec-WebSocket-Version": ["", "8", "12", "14", "13 ", "13,8", "-13", "9" * 100, "0x0d"]}[name]
            headers[index] = (name, rng.choice(values))
            kind = "hs_bad_value"
        elif r == 2:
            line = rng.choice(("POST /fuzz HTTP/1.1", "GET /fuzz HTTP/1.0", "GET /fuzz HTTP/2", "get /fuzz HTTP/1.1",
                               "GET  /fuzz HTTP/1.1", "GET /fuzz", "GET", "", "\x00", "GET /" + "a" * 6000 +
                               " HTTP/1.1", "GET http://x/ HTTP/1.1", "CONNECT x:1 HTTP/1.1", "GET /fuzz HTTP/1.1 x"))
            kind = "hs_bad_request_line"
        elif r == 3:
            headers.insert(rng.randrange(len(headers) + 1), ("X-No-Colon", None))
            text = self.head_bytes(line, [(k, v) for k, v in headers if v is not None])
            data = text.replace(b"\r\n\r\n", b"\r\nX-No-Colon\r\n\r\n")
            return data, "hs_header_without_colon", True
        elif r == 4:
            headers.insert(rng.randrange(1, len(headers) + 1), (" folded", "line"))
            kind = "hs_folded_line"
        elif r == 5:
            headers.append((rng.choice(("X-Nul", "X-High")), rng.choice(("\x00\x00", "\xff\xfe\xe9", "\x7f"))))
            kind = "hs_odd_bytes"
        elif r == 6:
            headers.extend((f"X-Many-{i}", "y" * rng.randrange(10)) for i in range(500))
            kind = "hs_many_headers"
        elif r == 7:
            return self.head_bytes(line, headers)[:-4] + b"\r\nX-Huge: " + b"h" * rng.choice((8200, 9000, 20000)), \
                "hs_head_over_8k", True
        elif r == 8:
            headers.append(("X-Big", "b" * rng.choice((7000, 8100))))
            kind = "hs_head_near_8k"
        elif r == 9:
            return self.head_bytes(line, headers).replace(b"\r\n", b"\n"), "hs_bare_lf", True
        elif r == 10:
            data = self.head_bytes(line, headers)
            return data[:rng.randrange(1, len(data) - 1)], "hs_partial", False
        elif r == 11:
            data = self.head_bytes(line, headers)
            return mutate(data, rng, rng.randrange(1, 8)), "hs_mutated", True
        elif r == 12:
            headers.append(("Sec-WebSocket-Extensions", rng.choice(BAD_OFFERS)))
            if rng.random() < 0.3:
                headers.append(("Sec-WebSocket-Extensions", rng.choice(VALID_OFFERS + BAD_OFFERS)))
            kind = "hs_odd_extensions"
        elif r == 13:
            headers.insert(rng.randrange(1, len(headers) + 1), rng.choice(headers[1:]))
            if rng.random() < 0.5:
                headers.append(("Sec-WebSocket-Key", base64.b64encode(rng.randbytes(16)).decode()))
            kind = "hs_repeated_header"
        elif r == 14:
            headers = [(k.upper() if rng.random() < 0.5 else k.lower(), v) for k, v in headers]
            rng.shuffle(headers)
            kind = "hs_case_and_order"
        elif r == 15:
            return self.tcp(LOGIN, 1, self.login_body()) + b"\r\n\r\n", "hs_tcp_packet_on_ws", True
        elif r == 16:
            return rng.randbytes(rng.choice((1, 10, 100, 4000, 9000))), "hs_random_bytes", False
        elif r == 17:
            headers = [(k + rng.choice((" ", "\t", "")), " \t" + v + " ") for k, v in headers]
            kind = "hs_whitespace"
        elif r == 18:
            return b"\r\n\r\n", "hs_empty_head", True
        else:
            headers[4] = ("Sec-WebSocket-Version", "13")
            headers.append(("Sec-WebSocket-Protocol", rng.choice(("chat", "", "a" * 1000, "x, y, z"))))
            headers.append(("Origin", rng.choice(("http://evil.example", "", "null", "\x00"))))
            kind = "hs_extra_headers"
        return self.head_bytes(line, headers), kind, True


def zip_bombs() -> list[bytes]:
    bombs = []
    for payload in (b"\x00\x02\x00\x01" + b"\x00" * 200_000, b"\x00\x09\x00\x01" + b"\x00" * (60 << 20),
                    b"\x00\x02\x00\x01" + b'{"content":"' + b"a" * 100_000 + b'"}'):
        compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
        data = compressor.compress(payload) + compressor.flush(zlib.Z_SYNC_FLUSH)
        bombs.append(data[:-4])
    return bombs
