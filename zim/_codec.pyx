# cython: language_level=3
"""The wire codec: TCP length-prefixed packets and RFC 6455 WebSocket frames.

The ``cdef`` functions are what the reactor calls on its read buffer; the
``TcpDecoder``/``WsDecoder`` classes wrap the very same functions for tests.
"""
from libc.stdint cimport uint8_t, uint32_t, uint64_t
from libc.stdlib cimport free, realloc
from libc.string cimport memcpy, memcmp

import base64
import hashlib

# ---------------------------------------------------------------- TCP ------

cdef int tcp_next(char* buf, size_t length, size_t max_packet,
                  packet_t* out, size_t* consumed) noexcept nogil:
    """Decode one packet at buf; consumed is set only for EV_PACKET."""
    cdef uint32_t total
    consumed[0] = 0
    if length < 4:
        return EV_NEED_MORE
    total = get32(buf)
    if total < TCP_HEADER:
        return EV_BROKEN
    if length < TCP_HEADER:
        return EV_NEED_MORE
    out.action = get16(buf + 4)
    out.seq = get16(buf + 6)
    if total > max_packet:
        return EV_TOO_LARGE
    if length < total:
        return EV_NEED_MORE
    out.body = buf + TCP_HEADER
    out.body_len = total - TCP_HEADER
    consumed[0] = total
    return EV_PACKET


cdef size_t tcp_header(char* out, size_t body_len, int action, int seq) noexcept nogil:
    put32(out, <uint32_t>(body_len + TCP_HEADER))
    put16(out + 4, action)
    put16(out + 6, seq)
    return TCP_HEADER


# ---------------------------------------------------------- WebSocket ------

cdef enum:
    OP_CONT = 0
    OP_TEXT = 1
    OP_BINARY = 2
    OP_CLOSE = 8
    OP_PING = 9
    OP_PONG = 10

cdef bint _valid_close_code(int code) noexcept nogil:
    """RFC 6455 7.4: codes a peer may send in a close frame."""
    if 1000 <= code <= 1003 or 1007 <= code <= 1014:
        return True
    return 3000 <= code <= 4999


cdef bint _valid_utf8(const char* text, size_t length) noexcept nogil:
    """Strict UTF-8 (no overlongs, surrogates or code points past U+10FFFF)."""
    cdef const uint8_t* p = <const uint8_t*>text
    cdef size_t i = 0, n, k
    cdef uint32_t cp
    while i < length:
        if p[i] < 0x80:
            i += 1
            continue
        if 0xC2 <= p[i] <= 0xDF:
            n = 1
            cp = p[i] & 0x1F
        elif 0xE0 <= p[i] <= 0xEF:
            n = 2
            cp = p[i] & 0x0F
        elif 0xF0 <= p[i] <= 0xF4:
            n = 3
            cp = p[i] & 0x07
        else:
            return False
        if i + n >= length:         # truncated sequence
            return False
        for k in range(1, n + 1):
            if (p[i + k] & 0xC0) != 0x80:
                return False
            cp = (cp << 6) | (p[i + k] & 0x3F)
        if (n == 2 and cp < 0x800) or (n == 3 and cp < 0x10000) or cp > 0x10FFFF \
                or 0xD800 <= cp <= 0xDFFF:
            return False
        i += n + 1
    return True


cdef inline void _unmask(char* p, size_t n, const char* key) noexcept nogil:
    cdef size_t i
    for i in range(n):
        p[i] = p[i] ^ key[i & 3]


cdef int ws_next(char* buf, size_t length, size_t max_packet, ws_state_t* st,
                 packet_t* out, size_t* consumed) noexcept nogil:
    """Decode one client frame at buf (unmasking it in place).

    A fragmented message is gathered in st.frag; its final frame yields
    EV_PACKET with body pointing into st.frag, valid until ws_release().
    """
    cdef uint8_t b0, b1
    cdef int opcode, fin
    cdef size_t header = 2, need
    cdef uint64_t plen
    cdef char* payload
    cdef char* grown
    cdef char key[4]
    cdef char first[4]
    cdef size_t message_len, have_first
    consumed[0] = 0
    out.close_code = 0
    if length < 2:
        return EV_NEED_MORE
    b0 = <uint8_t>buf[0]
    b1 = <uint8_t>buf[1]
    fin = b0 & 0x80
    opcode = b0 & 0x0F
    if b0 & 0x70:                      # RSV bits: no extension was negotiated
        return EV_BROKEN
    if not (b1 & 0x80):                # client frames must be masked
        return EV_BROKEN
    plen = b1 & 0x7F
    if plen == 126:
        header = 4
        if length < header:
            return EV_NEED_MORE
        plen = <uint64_t>get16(buf + 2)
        if plen < 126:
            return EV_BROKEN           # not the minimal encoding
    elif plen == 127:
        header = 10
        if length < header:
            return EV_NEED_MORE
        plen = get64(buf + 2)
        if plen >> 63 or plen < 65536:
            return EV_BROKEN
    header += 4
    if length < header:
        return EV_NEED_MORE
    memcpy(key, buf + header - 4, 4)

    if opcode >= OP_CLOSE:             # control frame
        if opcode > OP_PONG or not fin or plen > WS_MAX_CONTROL:
            return EV_BROKEN
        if length < header + plen:
            return EV_NEED_MORE
        payload = buf + header
        _unmask(payload, plen, key)
        consumed[0] = header + plen
        out.body = payload
        out.body_len = plen
        if opcode == OP_PING:
            return EV_PING
        if opcode == OP_PONG:
            return EV_PONG
        if plen == 1:
            return EV_BROKEN
        if plen >= 2:
            out.close_code = get16(payload)
            out.body = payload + 2
            out.body_len = plen - 2
            if not _valid_close_code(out.close_code):
                return EV_BROKEN
            if not _valid_utf8(out.body, out.body_len):
                return EV_BAD_UTF8
        return EV_CLOSE

    if opcode == OP_TEXT:
        return EV_TEXT if not st.frag_active else EV_BROKEN
    if opcode == OP_CONT:
        if not st.frag_active:
            return EV_BROKEN
    elif opcode == OP_BINARY:
        if st.frag_active:
            return EV_BROKEN
    else:
        return EV_BROKEN               # reserved opcode

    # Size check before waiting for the payload: a huge frame is refused as
    # soon as its action and seq (the message's first 4 bytes) are known.
    message_len = st.frag_len + plen
    if message_len + WS_PACKET_HEADER > max_packet:
        have_first = st.frag_len if st.frag_len < 4 else 4
        if have_first:
            memcpy(first, st.frag, have_first)
        need = 4 - have_first
        if need > plen:
            return EV_BROKEN
        if length < header + need:
            return EV_NEED_MORE
        memcpy(first + have_first, buf + header, need)
        _unmask(first + have_first, need, key)   # key offset 0: these are payload bytes 0..need-1
        out.action = get16(first)
        out.seq = get16(first + 2)
        return EV_TOO_LARGE

    if length < header + plen:
        return EV_NEED_MORE
    payload = buf + header
    _unmask(payload, plen, key)
    consumed[0] = header + plen

    if fin and not st.frag_active:     # the common case: one frame, no copy
        if plen < WS_PACKET_HEADER:
            return EV_BROKEN
        out.action = get16(payload)
        out.seq = get16(payload + 2)
        out.body = payload + WS_PACKET_HEADER
        out.body_len = plen - WS_PACKET_HEADER
        return EV_PACKET

    if plen:
        grown = <char*>realloc(st.frag, st.frag_len + plen)
        if grown == NULL:
            return EV_BROKEN
        st.frag = grown
        memcpy(st.frag + st.frag_len, payload, plen)
        st.frag_len += <uint32_t>plen
    st.frag_active = 1
    if not fin:
        return EV_SKIP
    st.frag_active = 0
    if st.frag_len < WS_PACKET_HEADER:
        return EV_BROKEN
    out.action = get16(st.frag)
    out.seq = get16(st.frag + 2)
    out.body = st.frag + WS_PACKET_HEADER
    out.body_len = st.frag_len - WS_PACKET_HEADER
    return EV_PACKET


cdef void ws_release(ws_state_t* st) noexcept nogil:
    """Free the reassembly buffer (after its packet was handled, or at close)."""
    if st.frag != NULL and not st.frag_active:
        free(st.frag)
        st.frag = NULL
        st.frag_len = 0


cdef size_t ws_frame_header(char* out, size_t payload_len, int opcode) noexcept nogil:
    """A server frame header (FIN set, unmasked); returns its length (2, 4 or 10)."""
    out[0] = <char>(0x80 | opcode)
    if payload_len < 126:
        out[1] = <char>payload_len
        return 2
    if payload_len < 65536:
        out[1] = <char>126
        put16(out + 2, <int>payload_len)
        return 4
    out[1] = <char>127
    put64(out + 2, payload_len)
    return 10


cdef size_t ws_packet_header(char* out, size_t body_len, int action, int seq) noexcept nogil:
    """Frame header plus action and seq for one binary message carrying body."""
    cdef size_t n = ws_frame_header(out, body_len + WS_PACKET_HEADER, OP_BINARY)
    put16(out + n, action)
    put16(out + n + 2, seq)
    return n + WS_PACKET_HEADER


cdef Py_ssize_t find_header_end(const char* buf, size_t length) noexcept nogil:
    """Offset just past the blank line ending an HTTP request head, or -1."""
    cdef size_t i
    if length < 4:
        return -1
    for i in range(length - 3):
        if buf[i] == b'\r' and buf[i + 1] == b'\n' and buf[i + 2] == b'\r' and buf[i + 3] == b'\n':
            return i + 4
    return -1


_WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


cdef bytes ws_handshake_response(bytes request):
    """The 101 answer to a valid RFC 6455 upgrade request head, else None.

    Runs once per WebSocket connection, so plain Python parsing is fine here.
    permessage-deflate is not accepted yet: a client offering it gets a plain
    session (the extension header is simply not echoed).
    """
    cdef list lines
    try:
        lines = request.decode("latin-1").split("\r\n")
    except Exception:
        return None
    parts = lines[0].split(" ")
    if len(parts) != 3 or parts[0] != "GET" or not parts[2].startswith("HTTP/1.1"):
        return None
    headers = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep:
            return None
        headers[name.strip().lower()] = value.strip()
    if headers.get("upgrade", "").lower() != "websocket":
        return None
    if "upgrade" not in {t.strip().lower() for t in headers.get("connection", "").split(",")}:
        return None
    if headers.get("sec-websocket-version") != "13":
        return None
    key = headers.get("sec-websocket-key", "")
    try:
        if len(base64.b64decode(key, validate=True)) != 16:
            return None
    except Exception:
        return None
    accept = base64.b64encode(hashlib.sha1(key.encode() + _WS_GUID).digest())
    return (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n")


# ------------------------------------------------- Python-level wrappers ---

def encode_tcp(int action, int seq, bytes body):
    """One TCP packet."""
    cdef char head[TCP_HEADER]
    tcp_header(head, len(body), action, seq)
    return head[:TCP_HEADER] + body


def encode_ws(int action, int seq, bytes body):
    """One server WebSocket binary message carrying a packet."""
    cdef char head[WS_MAX_FRAME_HEADER + WS_PACKET_HEADER]
    cdef size_t n = ws_packet_header(head, len(body), action, seq)
    return head[:n] + body


def encode_ws_control(int opcode, bytes payload):
    """One server control frame (close 8, ping 9, pong 10)."""
    cdef char head[WS_MAX_FRAME_HEADER]
    cdef size_t n = ws_frame_header(head, len(payload), opcode)
    return head[:n] + payload


def handshake_response(bytes request):
    """The 101 response for a WebSocket upgrade request head, or None."""
    return ws_handshake_response(request)


cdef class _Decoder:
    """Feed bytes, get events: the buffer handling shared by both decoders."""
    cdef bytearray pending
    cdef size_t max_packet
    cdef bint finished

    def __init__(self, size_t max_packet=65536):
        self.pending = bytearray()
        self.max_packet = max_packet
        self.finished = False

    cdef object _next(self, char* buf, size_t length, size_t* consumed):
        """One event tuple, () to skip, or None when more bytes are needed."""
        raise NotImplementedError

    def feed(self, bytes data):
        cdef list events = []
        cdef size_t consumed, offset = 0
        cdef char* buf
        if self.finished:
            return events
        self.pending += data
        buf = self.pending
        while not self.finished:
            event = self._next(buf + offset, len(self.pending) - offset, &consumed)
            offset += consumed
            if event is None:
                break
            if event:
                events.append(event)
                if event[0] not in ("packet", "ping", "pong"):
                    self.finished = True
        del self.pending[:offset]
        return events


cdef class TcpDecoder(_Decoder):
    """The reactor's tcp_next(), for tests."""

    cdef object _next(self, char* buf, size_t length, size_t* consumed):
        cdef packet_t pkt
        cdef int ev = tcp_next(buf, length, self.max_packet, &pkt, consumed)
        if ev == EV_PACKET:
            return ("packet", pkt.action, pkt.seq, pkt.body[:pkt.body_len])
        if ev == EV_TOO_LARGE:
            return ("too_large", pkt.action, pkt.seq)
        if ev == EV_BROKEN:
            return ("broken",)
        return None


cdef class WsDecoder(_Decoder):
    """The reactor's ws_next() on client frames, for tests."""
    cdef ws_state_t st

    def __dealloc__(self):
        self.st.frag_active = 0
        ws_release(&self.st)

    cdef object _next(self, char* buf, size_t length, size_t* consumed):
        cdef packet_t pkt
        cdef int ev = ws_next(buf, length, self.max_packet, &self.st, &pkt, consumed)
        if ev == EV_PACKET:
            event = ("packet", pkt.action, pkt.seq, pkt.body[:pkt.body_len])
            ws_release(&self.st)
            return event
        if ev == EV_SKIP:
            return ()
        if ev == EV_PING:
            return ("ping", pkt.body[:pkt.body_len])
        if ev == EV_PONG:
            return ("pong", pkt.body[:pkt.body_len])
        if ev == EV_CLOSE:
            return ("close", pkt.close_code or None, pkt.body[:pkt.body_len])
        if ev == EV_TOO_LARGE:
            return ("too_large", pkt.action, pkt.seq)
        if ev == EV_TEXT:
            return ("error", 1003)
        if ev == EV_BAD_UTF8:
            return ("error", 1007)
        if ev == EV_BROKEN:
            return ("error", 1002)
        return None
