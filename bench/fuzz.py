#!/usr/bin/env python3
"""A fuzz campaign against a real multi-worker server: random and mutated frames.

Starts a real server (``python -m zim --workers 2`` on loopback ports, a
temporary data directory; ``--workers`` and ``--server-args`` change it), takes
a baseline of it (the process ids of the whole tree: supervisor/router, workers,
store writer; the resident memory of the tree; the open descriptors of every one
of its processes, from /proc/PID/fd), then runs ``--processes`` fuzzing client
processes until they have written ``--frames`` frames (or ``--seconds`` passed),
while one honest client process does real work all along.

One **frame** is one unit written to the server: a TCP packet, a WebSocket
frame, a handshake attempt or a chunk of random bytes; it is counted once all
its bytes were accepted by the kernel (frames left unwritten because the server
had already closed the connection are not counted). Many frames go in one
``send`` and connections carry many frames, so that 10^6 frames take well under
a minute on 2 cores; every fuzzer keeps ``--connections`` connections going at once
(non-blocking, one epoll loop) and reads and discards everything the server
sends (a fuzzer that stops reading would only test ``--max-outbuf``).

What the fuzzers send (each connection is one *session*, chosen at random):

- **TCP streams**: often a valid login first (a token of the fuzzer's own users),
  then 1..200 requests in batches of up to 128: valid ones; one field of a valid request
  of action 1..9 replaced by a value of the wrong type or an edge value (null,
  booleans, floats, 2^63, 2^64, 400-digit numbers, 1e999, empty, 300 characters,
  lone surrogates, arrays, objects, deep nesting ...) or removed; bodies mutated
  byte-wise (bits flipped, bytes inserted, deleted, replaced); action and seq edge
  values (0, 32767, 32768, 65535, 100..103, 200); unknown actions; invalid UTF-8;
  bodies that are not objects; nesting 100..30,000 deep; huge numbers; random
  bytes behind a correct length; bodies right at the size limit. A stream may end
  with a breaking packet: length off by ±k, a huge length, a length below 8, a
  truncated packet, garbage after a packet, a mutated header, one byte over the
  limit, random bytes, HTTP or a WebSocket upgrade on the TCP port.
- **Random bytes** on the TCP port (1..70,000 bytes a write).
- **WebSocket handshakes**: missing, repeated or bad headers (Upgrade,
  Connection, Sec-WebSocket-Key not base64 or not 16 bytes, versions other than
  13), other methods and HTTP versions, headers without a colon, folded lines,
  NUL and high bytes, 500 headers, a head over 8 KiB, bare LF, partial heads
  (then a pause, then the rest or nothing), byte-wise mutated heads, malformed
  permessage-deflate offers, zim TCP packets and random bytes on the WS port.
- **WebSocket streams**: a good handshake (half of them negotiating
  permessage-deflate), often a login, then batches of masked frames: the
  requests above as binary messages (compressed or not when deflate was agreed),
  pings and unsolicited pongs, messages fragmented in 2..5 pieces with pings and
  pongs between the pieces (compressed ones too), empty continuations, zero and
  random masks. A stream may end with a breaking frame: unmasked, a reserved
  opcode, RSV1/RSV2/RSV3 where not allowed (RSV1 without deflate, on a control
  frame, on a continuation), a continuation with no message, a new message in
  the middle of a fragmented one, control frames over 125 bytes or fragmented,
  a text frame (valid or invalid UTF-8), close frames with bad codes, bad
  UTF-8 reasons or a 1-byte payload, 64-bit lengths (2^63, 2^64-1, 2^32,
  non-minimal), a message under 4 bytes, an oversize message (whole or
  fragmented), corrupt or truncated compressed data, zip bombs (200 KB and 60 MB
  of zeros), a message that refers back into the previous one (context
  takeover), or a byte-wise mutated frame; else a valid close or just an end.
- Every process starts with a **sweep**: each field of each action 1..9 set to
  each of the edge values, once, on a logged-in connection.

The mix of sessions: TCP streams 15%, short TCP sessions (0..3 requests) that
end with a breaking packet 20%, random bytes 10%, WebSocket streams 15%, short
WebSocket sessions that end with a breaking frame 20%, handshakes 20%; so most
frames are requests in streams and most connections end in a broken frame.

A session ends with a half-close and waits (at most ``--drain`` s) for the server
to close, so the server has read everything counted; 5% end with a reset
instead. All randomness comes from ``--seed`` (printed): session N of fuzzer P
uses ``random.Random(f"{seed}:{P}:{N}")`` and ``--replay P:N,...`` runs only
those sessions, one at a time, against a fresh server.

The honest client (a TCP user and a WebSocket user, one channel) loops the whole
time: a private message (answer, and the push to the receiver), a channel
message (answer and push), a history read (must hold the message just sent), a
mailbox pull and ack, a heartbeat, and every 20 rounds a fresh connection that
logs in with a token. Each request's latency is recorded; an error answer, a
missing push or anything slower than ``--honest-timeout`` is an error.

Checks at the end (after the fuzzers, then ``--settle`` seconds, all clients
closed), each one failing the run (exit status 1):

- **no crash**: the same server processes as at the baseline, all alive; no
  ``restarting``, ``ended (``, ``link to worker ... closed``, ``ERROR``,
  ``CRITICAL`` or ``Traceback`` in the server's log; exit status 0 on SIGTERM;
- **no descriptor leak**: every server process back to its baseline count of
  open descriptors, within ``--fd-slack`` (default 2; waits up to 20 s);
- **memory back near the baseline**: RSS of the tree after ≤ baseline ×
  ``--rss-factor`` (1.5) + ``--rss-slack-mib`` (32 MiB). Users, channels and
  memberships the fuzzers create legitimately are kept in memory by design, so
  "near" is not "equal"; the peak (sampled twice a second) is reported too;
- **honest client served throughout**: 0 errors, and it ran from before the
  first fuzz frame to after the last;
- **no ``internal`` answer** read by a fuzzer (uncompressed answers are scanned);
- **the campaign is complete**: at least ``--frames`` frames were written.

When a server process dies, the fuzzers are stopped at once and the sessions that
were open at the moment the log gives for the death are printed, with the
``--replay`` command that runs them again.

Example: ``python bench/fuzz.py --frames 1000000 --json``;
small: ``python bench/fuzz.py --frames 20000 --seconds 60``.
"""
from __future__ import annotations

import argparse
import base64
import errno
import multiprocessing
import os
import random
import re
import select
import shlex
import signal
import socket
import struct
import subprocess
import sys
import time
import zlib
from collections import Counter, deque

import orjson
import psutil

import benchlib

LOGIN, SEND_USER, SUBSCRIBE, SEND_CHANNEL, HISTORY, UNSUBSCRIBE, PULL, ACK, HEARTBEAT = range(1, 10)
PUSH_USER, PUSH_CHANNEL, PUSH_BATCH = 101, 102, 103
_TCP = struct.Struct(">IHH")     # length, action (as unsigned: 65535 is -1 to the server), seq
_WS_HEAD = struct.Struct(">HH")
OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
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


def masked(payload: bytes, mask: bytes) -> bytes:
    size = len(payload)
    if not size or mask == b"\0\0\0\0":
        return payload
    repeated = (mask * (size // 4 + 1))[:size]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(repeated, "big")).to_bytes(size, "big")


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
        return _TCP.pack(8 + len(body), action & 0xFFFF, seq & 0xFFFF) + body

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
            return _TCP.pack(max(8, len(packet) - k), action, seq) + body, "tcp_length_minus"
        if r == 1:
            return _TCP.pack(len(packet) + k, action, seq) + body, "tcp_length_plus"
        if r == 2:
            length = rng.choice((self.pool.max_packet + 1, 1 << 16 | 1, 1 << 24, 0x7FFFFFFF, 0x80000000,
                                 0xFFFFFFFF, rng.randrange(self.pool.max_packet + 1, 1 << 32)))
            return _TCP.pack(length, action, seq) + body[:rng.choice((0, 10, 1000))], "tcp_huge_length"
        if r == 3:
            return _TCP.pack(rng.randrange(8), action, seq) + body, "tcp_tiny_length"
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
        b0 = (0x80 if fin else 0) | (rsv << 4) | opcode
        size = len(payload) if length is None else length
        if encoding is None:
            encoding = 0 if size < 126 else (1 if size < 65536 else 2)
        bit = 0x80 if mask else 0
        if encoding == 0:
            head = bytes((b0, bit | size))
        elif encoding == 1:
            head = struct.pack(">BBH", b0, bit | 126, size)
        else:
            head = struct.pack(">BBQ", b0, bit | 127, size)
        if not mask:
            return head + payload
        key = self.mask()
        return head + key + masked(payload, key)

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
            frames, how = self.ws_message(_WS_HEAD.pack(action & 0xFFFF, seq & 0xFFFF) + body, deflate)
            return frames, f"{how}:{kind}"
        if r < 0.9:
            return [self.ws(OP_PING, rng.randbytes(rng.choice((0, 1, 4, 125))))], "ws_ping"
        if r < 0.95:
            return [self.ws(OP_PONG, rng.randbytes(rng.choice((0, 3, 125))))], "ws_pong"
        if r < 0.96:        # a mutated frame in the middle of the stream (may break it)
            action, seq, body, _ = self.request()
            frame = self.ws(OP_BINARY, _WS_HEAD.pack(action & 0xFFFF, seq & 0xFFFF) + body)
            return [mutate(frame, rng, rng.randrange(1, 4))], "ws_mutated_frame"
        # a message whose payload is split with empty continuations
        action, seq, body, _ = self.request()
        payload = _WS_HEAD.pack(action & 0xFFFF, seq & 0xFFFF) + body
        return [self.ws(OP_BINARY, payload, fin=False), self.ws(OP_CONT, b"", fin=False),
                self.ws(OP_CONT, b"", fin=True)], "ws_empty_continuations"

    def ws_breaking(self, deflate: bool) -> tuple[bytes, str]:
        """A frame (or a few) likely to end the connection."""
        rng = self.rng
        action, seq, body, _ = self.request()
        payload = _WS_HEAD.pack(action & 0xFFFF, seq & 0xFFFF) + body
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
            return self.ws(OP_CLOSE, struct.pack(">H", rng.choice(CLOSE_CODES)) + reason), "ws_close_code"
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


# -- sessions ---------------------------------------------------------------------------
# A session is a generator yielding chunks ``(data, ends, kinds)`` to write (a frame
# counts when the byte at its end offset was written; a kind of None is a frame
# split over several chunks that is counted with its last chunk), or commands:
# ("hold", seconds) and ("reset",) (close with a RST after the last chunk).

class Budget:
    """Frames a fuzzer may still start; sessions stop when it is spent."""

    def __init__(self, frames: int, deadline: float) -> None:
        self.left = frames
        self.deadline = deadline

    def take(self, wanted: int) -> int:
        if time.monotonic() >= self.deadline:
            return 0
        granted = max(0, min(wanted, self.left))
        self.left -= granted
        return granted

    def give_back(self, frames: int) -> None:
        self.left += frames


class SessionBudget:
    """One session's share of a ``Budget``: what it took, so that what it could not
    write (the server closed first) goes back to the others."""

    def __init__(self, budget: Budget) -> None:
        self.budget = budget
        self.taken = 0

    def take(self, wanted: int) -> int:
        granted = self.budget.take(wanted)
        self.taken += granted
        return granted


def pack(frames: list[tuple[bytes, str | None]]) -> tuple[bytes, list[int], list[str | None]]:
    ends, kinds, offset = [], [], 0
    for data, kind in frames:
        offset += len(data)
        ends.append(offset)
        kinds.append(kind)
    return b"".join(d for d, _ in frames), ends, kinds


def session_kind(rng: random.Random, number: int) -> str:
    if number == 0:
        return "sweep"
    r = rng.random()
    if r < 0.15:
        return "tcp_stream"
    if r < 0.35:
        return "tcp_break"
    if r < 0.45:
        return "tcp_random"
    if r < 0.60:
        return "ws_stream"
    if r < 0.80:
        return "ws_break"
    return "ws_handshake"


def run_session(kind: str, gen: Gen, budget: SessionBudget, tcp_sweep: bool):
    rng = gen.rng
    if kind == "sweep":
        yield from sweep_session(gen, budget, tcp=tcp_sweep)
    elif kind == "tcp_stream":
        yield from tcp_stream(gen, budget, login=rng.random() < 0.8, length=stream_length(rng), breaking=0.5)
    elif kind == "tcp_break":
        yield from tcp_stream(gen, budget, login=rng.random() < 0.5, length=rng.choice((0, 0, 1, 3)), breaking=1)
    elif kind == "tcp_random":
        for _ in range(rng.choice((1, 1, 1, 2, 4))):
            if not budget.take(1):
                return
            size = rng.choice((1, 3, 7, 8, 9, 16, 100, 1000, 4096, 70000))
            yield pack([(rng.randbytes(size), "tcp_random_bytes")])
    elif kind == "ws_stream":
        yield from ws_stream(gen, budget, deflate=rng.random() < 0.5, login=rng.random() < 0.8,
                             length=stream_length(rng), breaking=0.5)
    elif kind == "ws_break":
        yield from ws_stream(gen, budget, deflate=rng.random() < 0.6, login=rng.random() < 0.5,
                             length=rng.choice((0, 0, 1, 3)), breaking=1)
    else:
        yield from ws_handshake_session(gen, budget)
    if rng.random() < 0.05:
        yield ("reset",)


def sweep_session(gen: Gen, budget: SessionBudget, tcp: bool):
    requests = gen.sweep()
    rng = gen.rng
    frames: list[tuple[bytes, str | None]] = []
    requests.insert(0, (LOGIN, 1, gen.login_body()))
    granted = budget.take(len(requests) + 1)    # all at once: the sweep is not cut short by the others
    if not tcp:
        frames.append((gen.handshake_bytes(None), "ws_handshake"))
        granted -= 1
    requests = requests[:granted]
    for start in range(0, len(requests), 64):
        batch = requests[start:start + 64]
        for action, seq, body in batch:
            if tcp:
                frames.append((gen.tcp(action, seq, body), "tcp:sweep"))
            else:
                frames.append((gen.ws(OP_BINARY, _WS_HEAD.pack(action, seq) + body), "ws_message:sweep"))
        yield pack(frames)
        frames = []
        if rng.random() < 0.2:
            yield ("hold", 0.02)


def stream_length(rng: random.Random) -> int:
    return rng.choice((1, 2, 5, 10, 20, 50, 100, 200))


def tcp_stream(gen: Gen, budget: SessionBudget, login: bool, length: int, breaking: float):
    rng = gen.rng
    frames: list[tuple[bytes, str | None]] = []
    if login and budget.take(1):
        frames.append((gen.tcp(LOGIN, rng.randrange(1, 32768), gen.login_body()), "tcp_login"))
    remaining = length
    while remaining > 0:
        batch = budget.take(min(remaining, rng.choice((1, 8, 32, 64, 128))))
        if not batch:
            break
        remaining -= batch
        for _ in range(batch):
            if rng.random() < 0.01:     # a mutated packet in the middle of the stream (may desync it)
                action, seq, body, _ = gen.request()
                frames.append((mutate(gen.tcp(action, seq, body), rng, rng.randrange(1, 4)), "tcp_mutated_packet"))
            else:
                action, seq, body, what = gen.request()
                frames.append((gen.tcp(action, seq, body), "tcp:" + what))
        yield pack(frames)
        frames = []
        if rng.random() < 0.01:
            yield ("hold", rng.choice((0.05, 0.2, 0.5)))
    if rng.random() < breaking and budget.take(1):
        data, what = gen.tcp_breaking()
        frames.append((data, what))
    if frames:
        yield pack(frames)


def ws_stream(gen: Gen, budget: SessionBudget, deflate: bool, login: bool, length: int, breaking: float):
    rng = gen.rng
    if not budget.take(1):
        return
    offer = rng.choice(VALID_OFFERS) if deflate else None
    frames: list[tuple[bytes, str | None]] = [(gen.handshake_bytes(offer), "ws_handshake")]
    if login and budget.take(1):
        payload = _WS_HEAD.pack(LOGIN, rng.randrange(1, 32768)) + gen.login_body()
        frames.append((gen.ws(OP_BINARY, gen.deflate(payload) if deflate else payload, rsv=4 if deflate else 0),
                       "ws_login"))
    remaining = length
    while remaining > 0:
        wanted = min(remaining, rng.choice((1, 8, 32, 64, 128)))
        granted = budget.take(wanted)
        if not granted:
            break
        remaining -= granted
        produced = 0
        while produced < granted:
            parts, what = gen.ws_stream_frames(deflate)
            for part in parts:
                frames.append((part, what))
            produced += len(parts)
        if produced > granted:          # fragments and control frames between them: a few more
            budget.take(produced - granted)
        yield pack(frames)
        frames = []
        if rng.random() < 0.01:
            yield ("hold", rng.choice((0.05, 0.2, 0.5)))
    r = rng.random()
    if r < breaking and budget.take(1):
        frames.append(gen.ws_breaking(deflate))
    elif r < breaking + 0.2 and budget.take(1):
        frames.append((gen.ws(OP_CLOSE, struct.pack(">H", 1000) + b"bye"), "ws_close"))
    if frames:
        yield pack(frames)


def ws_handshake_session(gen: Gen, budget: SessionBudget):
    rng = gen.rng
    if not budget.take(1):
        return
    data, kind, complete = gen.bad_handshake()
    if not complete:
        # partial: part of it, a pause, then the rest of a good head or nothing
        yield pack([(data, None)])
        yield ("hold", rng.choice((0.05, 0.3, 1.0)))
        if rng.random() < 0.5 and kind == "hs_partial":
            rest = gen.handshake_bytes(None)
            yield pack([(rest[len(data):] if rest.startswith(data) else rest, kind)])
        else:
            yield pack([(b"", kind)])
        return
    if rng.random() < 0.3:
        # byte by byte for a while (a slow client), then the rest
        cut = rng.randrange(1, min(len(data), 40))
        for i in range(cut):
            yield pack([(data[i:i + 1], None)])
        yield pack([(data[cut:], kind)])
    else:
        yield pack([(data, kind)])
    if rng.random() < 0.5 and budget.take(1):      # in case it was accepted: a request
        payload = _WS_HEAD.pack(HEARTBEAT, 1) + b"{}"
        yield pack([(gen.ws(OP_BINARY, payload), "ws_after_odd_handshake")])


# -- a fuzzer process ---------------------------------------------------------------------
class Conn:
    __slots__ = ("sock", "fd", "script", "out", "pos", "ends", "kinds", "index", "state", "until",
                 "reset", "number", "started", "port", "budget", "counted", "kind")

    def __init__(self, sock, script, number: int, port: int, budget: SessionBudget, kind: str) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.script = script
        self.out = b""
        self.pos = 0
        self.ends: list[int] = []
        self.kinds: list[str | None] = []
        self.index = 0
        self.state = "send"         # send | hold | drain
        self.until = 0.0
        self.reset = False
        self.number = number
        self.started = time.time()
        self.kind = kind
        self.port = port
        self.budget = budget
        self.counted = 0


def make_pool(tcp_port: int, ws_port: int, sink_id: str, users: int, channels: int, proc: int,
              run_id: str, max_packet: int, bombs: list[bytes]) -> Pool:
    tokens, ids = [], []
    for i in range(users):
        sock = socket.create_connection((benchlib.LOOPBACK, tcp_port), timeout=10)
        try:
            sock.sendall(benchlib.tcp_packet(LOGIN, 1, orjson.dumps({"name": f"fuzz-{proc}-{i}"})))
            buffer = bytearray()
            deadline = time.monotonic() + 10
            answer = None
            while answer is None and time.monotonic() < deadline:
                chunk = sock.recv(65536)
                if not chunk:
                    raise RuntimeError("the server closed a fuzzer's setup login")
                buffer += chunk
                for action, seq, body in benchlib.tcp_split(buffer):
                    if (action, seq) == (LOGIN, 1):
                        answer = orjson.loads(body)
            if not answer or "token" not in answer:
                raise RuntimeError(f"fuzzer setup login failed: {answer}")
            tokens.append(answer["token"])
            ids.append(answer["id"])
        finally:
            sock.close()
    names = [f"fz-{run_id}-{proc}-{i}" for i in range(channels)]
    return Pool(tokens, ids, sink_id, names, max_packet, ws_port, bombs)


def fuzzer(proc: int, options: dict, counters, pipe) -> None:
    """One fuzzing client process: sessions on ``options['connections']`` sockets at a time."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        pool = make_pool(options["tcp_port"], options["ws_port"], options["sink_id"], options["users"],
                         options["channels"], proc, options["run_id"], options["max_packet"], options["bombs"])
    except Exception as exc:        # noqa: BLE001 - reported to the parent
        pipe.send(("error", f"fuzzer {proc}: {exc!r}"))
        return
    pipe.send(("ready",))
    if not pipe.poll(60) or pipe.recv()[0] != "go":
        return
    frames_by_kind: Counter = Counter()
    stats: Counter = Counter()
    recent: deque = deque(maxlen=20000)   # (session number, kind, start, end) of the last sessions, wall clock
    budget = Budget(options["frames"], time.monotonic() + options["seconds"])
    replay: list[int] | None = options.get("replay")
    epoll = select.epoll()
    conns: dict[int, Conn] = {}
    buffer = bytearray(1 << 18)
    sent_total = 0
    next_session = 0 if replay is None else None
    replay_queue = deque(replay or [])
    seed = options["seed"]
    internal_marker = b'"code":"internal"'
    concurrency = 1 if replay is not None else options["connections"]
    drain_seconds = options["drain"]

    def start_session() -> bool:
        nonlocal next_session
        if replay is not None:
            if not replay_queue:
                return False
            number = replay_queue.popleft()
        else:
            number = next_session
            next_session += 1
        rng = random.Random(f"{seed}:{proc}:{number}")
        kind = session_kind(rng, number)
        gen = Gen(rng, pool)
        share = SessionBudget(budget)
        script = run_session(kind, gen, share, tcp_sweep=proc % 2 == 0)
        port = options["tcp_port"] if kind.startswith("tcp") or (kind == "sweep" and proc % 2 == 0) \
            else options["ws_port"]
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        code = sock.connect_ex((benchlib.LOOPBACK, port))
        if code not in (0, errno.EINPROGRESS):
            stats["connect_errors"] += 1
            sock.close()
            return True
        conn = Conn(sock, script, number, port, share, kind)
        conns[conn.fd] = conn
        epoll.register(conn.fd, select.EPOLLIN | select.EPOLLOUT)
        stats["sessions"] += 1
        stats[f"session_{kind}"] += 1
        return True

    def finish(conn: Conn, how: str) -> None:
        pending = conn.budget.taken - conn.counted
        if pending > 0:
            stats["frames_unsent"] += pending
            budget.give_back(pending)           # other sessions write them
        conns.pop(conn.fd, None)
        try:
            epoll.unregister(conn.fd)
        except OSError:
            pass
        if conn.reset:
            conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.sock.close()
        stats[how] += 1
        recent.append((conn.number, conn.kind, round(conn.started, 3), round(time.time(), 3)))

    def refill(conn: Conn) -> None:
        """Next chunk of the script, or the next state when it has none."""
        while True:
            try:
                item = next(conn.script)
            except StopIteration:
                if conn.reset:
                    finish(conn, "closed_reset")
                    return
                try:
                    conn.sock.shutdown(socket.SHUT_WR)
                except OSError:
                    finish(conn, "closed_by_server")
                    return
                conn.state = "drain"
                conn.until = time.monotonic() + drain_seconds
                epoll.modify(conn.fd, select.EPOLLIN)
                return
            if item[0] == "hold":
                conn.state = "hold"
                conn.until = time.monotonic() + item[1]
                epoll.modify(conn.fd, select.EPOLLIN)
                return
            if item[0] == "reset":
                conn.reset = True
                continue
            conn.out, conn.ends, conn.kinds = item
            conn.pos = conn.index = 0
            if conn.out or conn.ends:
                return

    def write(conn: Conn) -> None:
        nonlocal sent_total
        while conn.fd in conns and conn.state == "send":
            if conn.pos >= len(conn.out) and conn.index >= len(conn.ends):
                refill(conn)
                continue
            if conn.pos < len(conn.out):
                try:
                    n = conn.sock.send(memoryview(conn.out)[conn.pos:conn.pos + (1 << 20)])
                except BlockingIOError:
                    return
                except OSError as exc:
                    finish(conn, "connect_errors" if exc.errno == errno.ECONNREFUSED else "closed_by_server")
                    return
                conn.pos += n
            ends, kinds = conn.ends, conn.kinds
            while conn.index < len(ends) and ends[conn.index] <= conn.pos:
                kind = kinds[conn.index]
                if kind is not None:
                    frames_by_kind[kind] += 1
                    sent_total += 1
                    conn.counted += 1
                conn.index += 1

    def read(conn: Conn) -> None:
        while True:
            try:
                n = conn.sock.recv_into(buffer)
            except BlockingIOError:
                return
            except OSError as exc:
                finish(conn, "connect_errors" if exc.errno == errno.ECONNREFUSED else
                       "closed_by_server" if conn.state != "drain" else "drained")
                return
            if n == 0:
                finish(conn, "closed_by_server" if conn.state != "drain" else "drained")
                return
            stats["bytes_received"] += n
            if internal_marker in buffer[:n]:      # uncompressed answers (TCP, plain WebSocket)
                stats["internal_answers"] += 1

    last_report = 0.0
    started = time.monotonic()
    hard_stop = started + options["seconds"] + drain_seconds + 10
    try:
        while True:
            now = time.monotonic()
            if now > hard_stop:
                stats["hard_stopped"] += 1
                break
            while len(conns) < concurrency and budget.left > 0 and now < budget.deadline:
                if not start_session():
                    break
            if not conns and (budget.left <= 0 or now >= budget.deadline or (replay is not None and not replay_queue)):
                break
            for fd, events in epoll.poll(0.05):
                conn = conns.get(fd)
                if conn is None:
                    continue
                if events & (select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR):
                    read(conn)
                    if fd not in conns:
                        continue
                if events & select.EPOLLOUT and conn.state == "send":
                    write(conn)
            now = time.monotonic()
            for conn in list(conns.values()):
                if conn.state == "hold" and now >= conn.until:
                    conn.state = "send"
                    epoll.modify(conn.fd, select.EPOLLIN | select.EPOLLOUT)
                    write(conn)
                elif conn.state == "drain" and now >= conn.until:
                    finish(conn, "drain_timeouts")
                elif conn.state == "send" and now >= budget.deadline + drain_seconds:
                    finish(conn, "cut_at_deadline")
            if now - last_report > 0.25:
                counters[proc] = sent_total
                last_report = now
                if pipe.poll() and pipe.recv()[0] == "stop":
                    break
    finally:
        for conn in list(conns.values()):
            finish(conn, "closed_at_stop")
        epoll.close()
        counters[proc] = sent_total
    pipe.send(("done", {"frames": sent_total, "by_kind": dict(frames_by_kind), "stats": dict(stats),
                        "seconds": time.monotonic() - started, "recent_sessions": list(recent)}))


# -- the honest client ----------------------------------------------------------------------
class HonestConn:
    """A blocking client (TCP or plain WebSocket) that keeps pushes apart from answers."""

    def __init__(self, kind: str, tcp_port: int, ws_port: int, timeout: float) -> None:
        self.kind = kind
        port = tcp_port if kind == "tcp" else ws_port
        self.sock = socket.create_connection((benchlib.LOOPBACK, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buffer = bytearray()
        self.pushes: list[tuple[int, dict]] = []
        self.answers: dict[tuple[int, int], dict] = {}
        self.seq = 0
        if kind == "ws":
            request, accept = benchlib.ws_handshake_request(port)
            self.sock.sendall(request)
            deadline = time.monotonic() + timeout
            while b"\r\n\r\n" not in self.buffer:
                self._recv(deadline)
            end = self.buffer.index(b"\r\n\r\n") + 4
            head = bytes(self.buffer[:end])
            del self.buffer[:end]
            if not benchlib.ws_handshake_ok(head, accept):
                raise RuntimeError(f"honest WebSocket upgrade refused: {head[:100]!r}")

    def _recv(self, deadline: float) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("timed out")
        self.sock.settimeout(remaining)
        chunk = self.sock.recv(1 << 16)
        if not chunk:
            raise ConnectionError("the server closed the honest connection")
        self.buffer += chunk

    def _take(self) -> None:
        if self.kind == "tcp":
            packets = benchlib.tcp_split(self.buffer)
        else:
            packets = []
            for opcode, action, seq, body in benchlib.ws_split(self.buffer):
                if opcode != OP_BINARY:
                    raise ConnectionError(f"honest WebSocket got opcode {opcode}: {body[:60]!r}")
                packets.append((action, seq, body))
        for action, seq, body in packets:
            value = orjson.loads(body) if body else {}
            if seq == 0:
                self.pushes.append((action, value))
            else:
                self.answers[(action, seq)] = value

    def send(self, action: int, body: dict) -> int:
        self.seq = self.seq % 32767 + 1
        payload = orjson.dumps(body)
        self.sock.sendall(benchlib.tcp_packet(action, self.seq, payload) if self.kind == "tcp"
                          else benchlib.ws_packet(action, self.seq, payload))
        return self.seq

    def answer(self, action: int, seq: int, deadline: float) -> dict:
        while True:
            self._take()
            if (action, seq) in self.answers:
                return self.answers.pop((action, seq))
            self._recv(deadline)

    def push(self, actions: tuple[int, ...], match, deadline: float) -> dict:
        while True:
            self._take()
            for i, (got, body) in enumerate(self.pushes):
                if got in actions and match(body):
                    del self.pushes[:i + 1]
                    return body
            self._recv(deadline)

    def request(self, action: int, body: dict, timeout: float) -> tuple[dict, float]:
        start = time.monotonic()
        seq = self.send(action, body)
        answer = self.answer(action, seq, start + timeout)
        elapsed = time.monotonic() - start
        if "error" in answer:
            raise RuntimeError(f"action {action} answered {answer['error']}")
        return answer, elapsed

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def honest(options: dict, pipe) -> None:
    """Real work in a loop until told to stop: see the module docstring."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    timeout = options["honest_timeout"]
    tcp_port, ws_port = options["tcp_port"], options["ws_port"]
    channel = f"honest-{options['run_id']}"
    latencies: list[float] = []
    push_latencies: list[float] = []
    errors: list[str] = []
    stats: Counter = Counter()
    users: dict[str, dict] = {}
    conns: dict[str, HonestConn] = {}

    def connect(who: str, kind: str) -> None:
        if who in conns:
            conns.pop(who).close()
        conn = HonestConn(kind, tcp_port, ws_port, timeout)
        body = {"name": f"honest-{who}"}
        if who in users:
            body["token"] = users[who]["token"]
        answer, elapsed = conn.request(LOGIN, body, timeout)
        latencies.append(elapsed)
        users[who] = answer
        conns[who] = conn
        _, elapsed = conn.request(SUBSCRIBE, {"name": channel}, timeout)
        latencies.append(elapsed)

    def timed(who: str, action: int, body: dict) -> dict:
        answer, elapsed = conns[who].request(action, body, timeout)
        latencies.append(elapsed)
        stats["requests"] += 1
        return answer

    try:
        connect("a", "tcp")
        connect("b", "ws")
    except Exception as exc:        # noqa: BLE001
        pipe.send(("error", f"honest client setup: {exc!r}"))
        return
    first = last = None
    rounds = 0
    stop = False
    hard_stop = time.monotonic() + options["seconds"] + 120
    while not stop and time.monotonic() < hard_stop:
        if pipe.poll():
            stop = pipe.recv()[0] == "stop"
        rounds += 1
        try:
            a, b = conns["a"], conns["b"]
            text = f"dm {rounds}"
            sent = time.monotonic()
            timed("a", SEND_USER, {"receiverId": users["b"]["id"], "content": text})
            b.push((PUSH_USER,), lambda m, t=text: m.get("content") == t, sent + timeout)
            push_latencies.append(time.monotonic() - sent)
            text = f"channel {rounds}"
            sent = time.monotonic()
            answer = timed("b", SEND_CHANNEL, {"channel": channel, "content": text})
            # a 102, or with --push-window-ms a 103 holding it
            a.push((PUSH_CHANNEL, PUSH_BATCH), lambda m, t=text: m.get("content") == t or any(
                isinstance(x, dict) and x.get("content") == t for x in m.get("messages") or ()), sent + timeout)
            push_latencies.append(time.monotonic() - sent)
            page = timed("a", HISTORY, {"channel": channel, "limit": 3})
            if not page.get("messages") or page["messages"][-1].get("content") != text \
                    or page["messages"][-1].get("seq") != answer.get("seq"):
                raise RuntimeError(f"history does not end with the message just sent: {page}")
            box = timed("b", PULL, {"limit": 100})
            ids = [m["id"] for m in box.get("messages", [])]
            if ids:
                timed("b", ACK, {"ids": ids})
            timed("a", HEARTBEAT, {})
            a.pushes.clear()
            b.pushes.clear()
            if rounds % 20 == 0:
                fresh = HonestConn("tcp", tcp_port, ws_port, timeout)
                try:
                    _, elapsed = fresh.request(LOGIN, {"name": "honest-a", "token": users["a"]["token"]}, timeout)
                    latencies.append(elapsed)
                    _, elapsed = fresh.request(HEARTBEAT, {}, timeout)
                    latencies.append(elapsed)
                    stats["requests"] += 2
                    stats["fresh_connections"] += 1
                finally:
                    fresh.close()
            now = time.time()
            if first is None:
                pipe.send(("ready",))       # one round done: the fuzzers may start
                first = now
            last = now
        except Exception as exc:        # noqa: BLE001 - every failure is an error to report
            errors.append(f"{time.strftime('%H:%M:%S')} round {rounds}: {exc!r}")
            stats["errors"] += 1
            try:
                connect("a", "tcp")
                connect("b", "ws")
                stats["reconnects"] += 1
            except Exception as again:  # noqa: BLE001
                errors.append(f"reconnect failed: {again!r}")
                time.sleep(0.5)
        if not stop:
            time.sleep(options["honest_interval"])
    for conn in conns.values():
        conn.close()
    latencies.sort()
    push_latencies.sort()
    pipe.send(("done", {
        "rounds": rounds, "requests": len(latencies), "errors": stats["errors"], "error_samples": errors[:10],
        "reconnects": stats["reconnects"], "fresh_connections": stats["fresh_connections"],
        "p50_ms": _ms(benchlib.percentile(latencies, 0.5)), "p99_ms": _ms(benchlib.percentile(latencies, 0.99)),
        "max_ms": _ms(latencies[-1] if latencies else None),
        "push_p50_ms": _ms(benchlib.percentile(push_latencies, 0.5)),
        "push_p99_ms": _ms(benchlib.percentile(push_latencies, 0.99)),
        "first_round_at": first, "last_round_at": last,
    }))


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 2)


# -- the server's state -------------------------------------------------------------------
def tree(root: psutil.Process) -> list[psutil.Process]:
    return [root, *root.children(recursive=True)]


def fd_counts(pids: list[int]) -> dict[int, int | None]:
    counts = {}
    for pid in pids:
        try:
            counts[pid] = len(os.listdir(f"/proc/{pid}/fd"))
        except OSError:
            counts[pid] = None
    return counts


def is_alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def rss_of(pids: list[int]) -> dict[int, int]:
    out = {}
    for pid in pids:
        try:
            out[pid] = psutil.Process(pid).memory_info().rss
        except psutil.Error:
            out[pid] = 0
    return out


def role(process: psutil.Process) -> str:
    try:
        command = process.cmdline()
    except psutil.Error:
        return "gone"
    if "zim.worker" in command:
        try:
            return f"worker{command[command.index('--index') + 1]}"
        except (ValueError, IndexError):
            return "worker"
    if "zim.storage.writer" in command:
        return "writer"
    if "-m" in command and "zim" in command:
        return "router"
    return os.path.basename(command[0]) if command else "?"


LOG_PROBLEMS = re.compile(r"Traceback|restarting|ended \(| ERROR | CRITICAL |link to worker \d+ closed|"
                          r"Segmentation|core dumped|MemoryError")
CLOSES = re.compile(r"^\S+ \S+ zim\.closes\S* WARNING (\S+): \d+ connections closed \((\w+):.*, (\d+) in all")


def first_death_in_log(problems: list[str]) -> float | None:
    """When the log first says a server process ended (its own timestamp, local time)."""
    for line in problems:
        if "ended (" in line or "restarting" in line:
            try:
                stamp, _, millis = " ".join(line.split()[:2]).partition(",")
                return time.mktime(time.strptime(stamp, "%Y-%m-%d %H:%M:%S")) + int(millis) / 1000
            except ValueError:
                continue
    return None


def stop_server(server: benchlib.Server, timeout: float = 20.0) -> tuple[int | None, str]:
    """SIGTERM once; the exit status and the whole log. Then the usual cleanup."""
    code = None
    log = ""
    process = server.process
    if process is not None and process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            code = process.wait(timeout)
        except subprocess.TimeoutExpired:
            code = None
    elif process is not None:
        code = process.returncode
    if server._log is not None:
        server._log.flush()
        server._log.seek(0)
        log = server._log.read().decode("utf-8", "replace")
    server.stop()
    return code, log


def new_user(port: int) -> str:
    conn = HonestConn("tcp", port, 0, 10)
    try:
        answer, _ = conn.request(LOGIN, {"name": "fuzz-sink"}, 10)
        return answer["id"]
    finally:
        conn.close()


def zip_bombs() -> list[bytes]:
    bombs = []
    for payload in (b"\x00\x02\x00\x01" + b"\x00" * 200_000, b"\x00\x09\x00\x01" + b"\x00" * (60 << 20),
                    b"\x00\x02\x00\x01" + b'{"content":"' + b"a" * 100_000 + b'"}'):
        compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
        data = compressor.compress(payload) + compressor.flush(zlib.Z_SYNC_FLUSH)
        bombs.append(data[:-4])
    return bombs


def parse_replay(text: str) -> dict[int, list[int]]:
    sessions: dict[int, list[int]] = {}
    for item in text.split(","):
        proc, _, number = item.strip().partition(":")
        sessions.setdefault(int(proc), []).append(int(number))
    return sessions


# -- the campaign ---------------------------------------------------------------------------
def run(args, info: dict) -> int:
    extra = shlex.split(args.server_args)
    max_packet = 65536
    if "--max-packet" in extra:
        max_packet = int(extra[extra.index("--max-packet") + 1])
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 32)
    replay = parse_replay(args.replay) if args.replay else None
    processes = len(replay) if replay else args.processes
    what = f"sessions {args.replay} only, one at a time" if replay else \
        f"{args.frames:,} frames, {processes} fuzzer processes x {args.connections} connections"
    print(f"# seed {seed} (repeat with --seed {seed}); {what}, --workers {args.workers}, at most {args.seconds:g} s")
    sys.stdout.flush()
    bombs = zip_bombs()
    server = benchlib.Server(workers=args.workers, extra_args=extra)
    root = server.start()
    result: dict = {"bench": "fuzz", "seed": seed, "frames_wanted": args.frames, "workers": args.workers,
                    "processes": processes, "connections": args.connections, "machine": info,
                    "server_command": server.command}
    failures: list[str] = []
    fuzzers = benchlib.ClientProcesses()
    honest_proc = benchlib.ClientProcesses()
    code: int | None = None
    log = ""
    try:
        sink_id = new_user(server.tcp_port)
        time.sleep(1.0)
        processes_before = tree(root)
        pids = sorted(p.pid for p in processes_before)
        roles = {p.pid: role(p) for p in processes_before}
        fds_before = fd_counts(pids)
        rss_before = rss_of(pids)
        baseline = sum(rss_before.values())
        print("# server tree: " + ", ".join(f"{roles[p]} {p} (fds {fds_before[p]}, rss {rss_before[p] / MIB:.1f} MiB)"
                                             for p in pids))
        run_id = f"{seed:x}"
        options = {"tcp_port": server.tcp_port, "ws_port": server.ws_port, "sink_id": sink_id,
                   "users": args.users, "channels": args.channels, "run_id": run_id, "max_packet": max_packet,
                   "bombs": bombs, "seed": seed, "seconds": args.seconds, "connections": args.connections,
                   "drain": args.drain, "honest_timeout": args.honest_timeout,
                   "honest_interval": args.honest_interval}
        honest_proc.start(honest, [(options,)])
        message = honest_proc.receive_all(60, "complete a first honest round")[0]
        if message[0] != "ready":
            raise RuntimeError(message[1])
        counters = multiprocessing.get_context("fork").Array("q", processes, lock=False)
        per_process = -(-args.frames // processes)
        arguments = []
        for index in range(processes):
            these = dict(options, frames=per_process)
            proc = index
            if replay:
                proc = sorted(replay)[index]
                these.update(replay=replay[proc], frames=1 << 40)
            arguments.append((proc, these, counters))
        fuzzers.start(fuzzer, arguments)
        for message in fuzzers.receive_all(60, "set up its users"):
            if message[0] != "ready":
                raise RuntimeError(message[1])
        start = time.monotonic()
        fuzz_started_at = time.time()
        fuzzers.send_all(("go",))
        peak = baseline
        last_print = start
        dead_at = None
        reports: list = [None] * processes
        while any(r is None for r in reports):
            now = time.monotonic()
            if now - start > args.seconds + args.drain + 60:
                raise RuntimeError("the fuzzers did not finish in time")
            for i, pipe in enumerate(fuzzers.pipes):
                if reports[i] is None and pipe.poll():
                    reports[i] = pipe.recv()[1]
            rss_now = sum(rss_of(pids).values())
            peak = max(peak, rss_now)
            if dead_at is None and not all(is_alive(p) for p in pids):
                dead_at = round(time.time(), 3)
                print(f"# a server process ended at {time.strftime('%H:%M:%S')}: stopping the fuzzers",
                      file=sys.stderr)
                for pipe in fuzzers.pipes:      # their last sessions are the suspects
                    pipe.send(("stop",))
            if now - last_print >= 10:
                sent = sum(counters)
                print(f"# {now - start:5.0f} s: {sent:,} frames ({sent / (now - start):,.0f}/s), "
                      f"server RSS {rss_now / MIB:.1f} MiB", file=sys.stderr)
                last_print = now
            time.sleep(0.5)
        fuzz_seconds = time.monotonic() - start
        fuzz_ended_at = time.time()
        time.sleep(min(2.0, args.settle))   # the honest client goes on a little after the last frame
        honest_proc.send_all(("stop",))
        honest_report = honest_proc.receive_all(args.honest_timeout * 3 + 30, "report")[0]
        if honest_report[0] != "done":
            raise RuntimeError(honest_report[1])
        honest_report = honest_report[1]
        fuzzers.stop()
        honest_proc.stop()

        # -- the checks -------------------------------------------------------------------
        time.sleep(args.settle)
        deadline = time.monotonic() + 20
        while True:
            fds_after = fd_counts(pids)
            leaks = {p: (fds_after[p] - fds_before[p]) if fds_after[p] is not None else None for p in pids}
            if all(v is not None and abs(v) <= args.fd_slack for v in leaks.values()) \
                    or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        rss_after_each = rss_of(pids)
        rss_after = sum(rss_after_each.values())
        now_pids = sorted(p.pid for p in tree(root)) if psutil.pid_exists(root.pid) else []
        alive = [p for p in pids if is_alive(p)]
        code, log = stop_server(server)
        problems = [line for line in log.splitlines() if LOG_PROBLEMS.search(line)]
        closes: dict[str, int] = {}
        for line in log.splitlines():
            match = CLOSES.match(line)
            if match:
                closes[f"{match.group(1)} {match.group(2)}"] = int(match.group(3))
        # one crash: a process of the baseline gone (and perhaps restarted), or a restart in the log
        crashes = max(len(pids) - len(alive), sum(1 for line in problems if "restarting" in line))
        frames = sum(r["frames"] for r in reports)
        by_kind: Counter = Counter()
        stats: Counter = Counter()
        for r in reports:
            by_kind.update(r["by_kind"])
            stats.update(r["stats"])
        leaked = {roles[p]: v for p, v in leaks.items() if v is None or abs(v) > args.fd_slack}
        rss_limit = baseline * args.rss_factor + args.rss_slack_mib * MIB

        if crashes or len(alive) != len(pids):
            failures.append(f"crashes: {crashes} (alive {len(alive)} of {len(pids)} server processes, "
                            f"now {now_pids} vs {pids})")
        if problems:
            failures.append(f"{len(problems)} problem lines in the server log, first: {problems[0][:300]}")
        if code != 0:
            failures.append(f"server exit status on SIGTERM: {code}")
        if leaked:
            failures.append(f"descriptors not back to the baseline (±{args.fd_slack}): {leaked}")
        if rss_after > rss_limit:
            failures.append(f"RSS after {rss_after / MIB:.1f} MiB > baseline {baseline / MIB:.1f} MiB x "
                            f"{args.rss_factor:g} + {args.rss_slack_mib:g} MiB")
        if honest_report["errors"]:
            failures.append(f"honest client: {honest_report['errors']} errors: {honest_report['error_samples'][:3]}")
        if not honest_report["first_round_at"] or honest_report["first_round_at"] > fuzz_started_at \
                or honest_report["last_round_at"] < fuzz_ended_at:
            failures.append("the honest client did not complete rounds from before the first fuzz frame "
                            "to after the last")
        if not replay and frames < args.frames:
            failures.append(f"only {frames:,} of {args.frames:,} frames within {args.seconds:g} s")
        if stats.get("internal_answers"):
            failures.append(f"{stats['internal_answers']} answers with the error code internal (a server bug)")
        if stats.get("connect_errors"):
            failures.append(f"{stats['connect_errors']} connections refused")
        ok = not failures
        groups: Counter = Counter()
        for kind, n in by_kind.items():
            groups[kind.split(":")[0]] += n
        print("# frames by kind: " + ", ".join(f"{k} {v:,}" for k, v in sorted(groups.items())))
        print(f"# sessions {stats['sessions']:,}: " + ", ".join(
            f"{k[8:]} {v:,}" for k, v in sorted(stats.items()) if k.startswith("session_")))
        print(f"# ends: drained {stats['drained']:,}, closed by the server {stats['closed_by_server']:,}, "
              f"reset {stats['closed_reset']:,}, drain timeouts {stats['drain_timeouts']:,}; "
              f"frames unsent (server had closed) {stats['frames_unsent']:,}; "
              f"'internal' answers seen {stats['internal_answers']:,}")
        if closes:
            print("# server closes (log): " + ", ".join(f"{k} {v:,}" for k, v in sorted(closes.items())))
        print("# descriptors before/after: " + ", ".join(
            f"{roles[p]} {fds_before[p]}/{fds_after[p]}" for p in pids))
        print("# RSS before/after by process (MiB): " + ", ".join(
            f"{roles[p]} {rss_before[p] / MIB:.1f}/{rss_after_each[p] / MIB:.1f}" for p in pids))
        print(f"# honest: {honest_report['requests']:,} requests in {honest_report['rounds']:,} rounds, "
              f"errors {honest_report['errors']}, p50 {honest_report['p50_ms']} ms, p99 {honest_report['p99_ms']} ms,"
              f" max {honest_report['max_ms']} ms; push p50 {honest_report['push_p50_ms']} ms, "
              f"p99 {honest_report['push_p99_ms']} ms")
        for failure in failures:
            print(f"# FAILED: {failure}")
        suspects = []
        death = first_death_in_log(problems) or dead_at
        if not ok:
            # the sessions open during the 3 s before a death was seen (else the last 20 of each fuzzer)
            for index, r in enumerate(reports):
                proc = sorted(replay)[index] if replay else index
                sessions = r["recent_sessions"]
                if death:
                    chosen = [x for x in sessions if x[2] <= death + 0.05 and x[3] >= death - 0.25]
                else:
                    chosen = sessions[-20:]
                suspects.extend((proc, *x) for x in chosen)
            if death:
                print(f"# a server process died at {death:.3f} ({time.strftime('%H:%M:%S', time.localtime(death))}"
                      f"{'' if death != dead_at else ', when this bench saw it'}); the sessions open then:")
            else:
                print("# the last sessions of each fuzzer:")
            print(f"#   {len(suspects)} sessions: " + " ".join(f"{p}:{n}:{k}" for p, n, k, _, _ in suspects[:60]))
            if suspects:
                print(f"#   replay them: python bench/fuzz.py --seed {seed} --replay "
                      + ",".join(f"{p}:{n}" for p, n, *_ in suspects))
        print(f"RESULT fuzz frames={frames} seconds={fuzz_seconds:.1f} rate={frames / fuzz_seconds:,.0f}/s "
              f"crashes={crashes} fd_leaks={len(leaked)} rss_before_mib={baseline / MIB:.1f} "
              f"rss_peak_mib={peak / MIB:.1f} rss_after_mib={rss_after / MIB:.1f} "
              f"ratio={rss_after / baseline:.2f} (limit {rss_limit / MIB:.1f}) honest_requests="
              f"{honest_report['requests']} honest_errors={honest_report['errors']} "
              f"honest_p50_ms={honest_report['p50_ms']} honest_p99_ms={honest_report['p99_ms']} "
              f"{'OK' if ok else 'FAILED'}")
        result.update({
            "ok": ok, "failures": failures, "frames": frames, "seconds": round(fuzz_seconds, 2),
            "frames_per_second": round(frames / fuzz_seconds), "frames_by_group": dict(groups),
            "frames_by_kind": dict(by_kind), "client_stats": dict(stats), "crashes": crashes,
            "server_pids_before": pids, "server_pids_after": now_pids, "server_roles": {str(p): roles[p] for p in pids},
            "log_problems": problems[:20], "server_exit_code": code, "server_closes": closes,
            "fds_before": {roles[p]: fds_before[p] for p in pids}, "fds_after": {roles[p]: fds_after[p] for p in pids},
            "fd_leaks": len(leaked), "fd_slack": args.fd_slack,
            "rss_before": baseline, "rss_peak": peak, "rss_after": rss_after,
            "rss_ratio": round(rss_after / baseline, 3), "rss_limit": int(rss_limit),
            "rss_rule": f"after <= before x {args.rss_factor:g} + {args.rss_slack_mib:g} MiB",
            "honest": honest_report,
            "suspect_sessions": [f"{p}:{n}" for p, n, *_ in suspects] or None,
            "first_death_at": death,
        })
    finally:
        fuzzers.stop()
        honest_proc.stop()
        if server.process is not None and server._log is not None:
            stop_server(server)
    if args.json:
        benchlib.print_json(result)
    return 0 if result.get("ok") else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=1_000_000, metavar="N",
                        help="frames to write, over all fuzzers (default 1,000,000)")
    parser.add_argument("--seconds", type=float, default=900.0, metavar="S",
                        help="stop the fuzzers after S seconds even if N frames were not written (a failure)")
    parser.add_argument("--processes", type=int, default=2, metavar="P", help="fuzzer processes (default 2)")
    parser.add_argument("--connections", type=int, default=32, metavar="K",
                        help="connections each fuzzer keeps going at once (default 32)")
    parser.add_argument("--workers", type=int, default=2, metavar="W", help="server --workers (default 2)")
    parser.add_argument("--server-args", default="", metavar="FLAGS",
                        help='more server flags, e.g. "--ws-deflate off --max-packet 4096"')
    parser.add_argument("--seed", type=int, default=None, help="RNG seed (default: random, printed)")
    parser.add_argument("--replay", default="", metavar="P:N,...",
                        help="run only these sessions (fuzzer P's session N), one at a time, with --seed")
    parser.add_argument("--users", type=int, default=8, metavar="N", help="users per fuzzer (default 8)")
    parser.add_argument("--channels", type=int, default=16, metavar="N", help="channels per fuzzer (default 16)")
    parser.add_argument("--drain", type=float, default=5.0, metavar="S",
                        help="wait at most S s for the server to close a finished session (default 5)")
    parser.add_argument("--settle", type=float, default=3.0, metavar="S",
                        help="seconds between the last client and the checks (default 3)")
    parser.add_argument("--honest-timeout", type=float, default=5.0, metavar="S",
                        help="an honest request slower than S s is an error (default 5)")
    parser.add_argument("--honest-interval", type=float, default=0.01, metavar="S",
                        help="pause between the honest client's rounds (default 0.01)")
    parser.add_argument("--fd-slack", type=int, default=2, metavar="N",
                        help="descriptors a server process may differ from its baseline by (default 2)")
    parser.add_argument("--rss-factor", type=float, default=1.5, metavar="F")
    parser.add_argument("--rss-slack-mib", type=float, default=32.0, metavar="MIB",
                        help="RSS after must be <= before x F + MIB (defaults 1.5 and 32)")
    parser.add_argument("--json", action="store_true", help="print a JSON result as the last line")
    args = parser.parse_args()
    if args.frames < 1 or args.processes < 1 or args.connections < 1 or args.seconds <= 0:
        parser.error("--frames, --processes, --connections and --seconds must be positive")
    return benchlib.run_main("fuzz", f"fuzz campaign: {args.frames:,} frames against --workers {args.workers}",
                             args, run)


if __name__ == "__main__":
    sys.exit(main())
