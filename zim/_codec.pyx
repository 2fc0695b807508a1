# cython: language_level=3
"""The wire codec: TCP length-prefixed packets and RFC 6455 WebSocket frames.

The ``cdef`` functions are what the reactor calls on its read buffer; the
``TcpDecoder``/``WsDecoder`` classes wrap the very same functions for tests.
"""
from libc.stdint cimport uint8_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free, malloc, realloc
from libc.string cimport memcpy, memcmp, memset

import base64
import hashlib
import re

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
                 zcodec_t* z, packet_t* out, size_t* consumed) noexcept nogil:
    """Decode one client frame at buf (unmasking it in place).

    A fragmented message is gathered in st.frag; its final frame yields
    EV_PACKET with body pointing into st.frag, valid until ws_release().
    ``z`` is NULL unless the connection negotiated permessage-deflate; then a
    message whose first frame has RSV1 set is inflated into z.inflated, and
    max_packet applies to its inflated size.
    """
    cdef uint8_t b0, b1
    cdef int opcode, fin
    cdef bint deflated
    cdef size_t header = 2, need
    cdef uint64_t plen
    cdef char* payload
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
    deflated = (b0 & 0x40) != 0
    if b0 & 0x30:                      # RSV2, RSV3: no extension uses them
        return EV_BROKEN
    # RSV1 marks a compressed message: only with deflate negotiated, and only on
    # the first frame of a data message (RFC 7692 6.1)
    if deflated and (z == NULL or opcode == OP_CONT or opcode >= OP_CLOSE):
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

    deflated = deflated or st.frag_deflated
    if deflated and z == NULL:
        return EV_BROKEN
    # Size check before waiting for the payload: a huge frame is refused as
    # soon as its action and seq (the message's first 4 bytes) are known.
    message_len = st.frag_len + plen
    if deflated:
        if message_len > _compressed_limit(max_packet):
            return _refuse_deflated(buf, length, header, plen, key, st, z, out)
    elif message_len + WS_PACKET_HEADER > max_packet:
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
    if deflated:
        return _inflate_frame(payload, plen, fin, max_packet, st, z, out)

    if fin and not st.frag_active:     # the common case: one frame, no copy
        if plen < WS_PACKET_HEADER:
            return EV_BROKEN
        out.action = get16(payload)
        out.seq = get16(payload + 2)
        out.body = payload + WS_PACKET_HEADER
        out.body_len = plen - WS_PACKET_HEADER
        return EV_PACKET

    if not _gather(st, payload, plen):
        return EV_BROKEN
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


cdef bint _gather(ws_state_t* st, const char* payload, size_t plen) noexcept nogil:
    """Append a fragment's payload to the message being reassembled."""
    cdef char* grown
    if plen:
        grown = <char*>realloc(st.frag, st.frag_len + plen)
        if grown == NULL:
            return False
        st.frag = grown
        memcpy(st.frag + st.frag_len, payload, plen)
        st.frag_len += <uint32_t>plen
    st.frag_active = 1
    return True


cdef extern from "zlib.h" nogil:
    enum:
        Z_OK, Z_STREAM_END, Z_BUF_ERROR, Z_NO_FLUSH, Z_SYNC_FLUSH, Z_DEFLATED, Z_DEFAULT_STRATEGY
    const char* ZLIB_VERSION
    int deflateInit2(z_stream* strm, int level, int method, int window_bits, int mem_level, int strategy)
    int deflate(z_stream* strm, int flush)
    int deflateReset(z_stream* strm)
    int deflateParams(z_stream* strm, int level, int strategy)
    int deflateEnd(z_stream* strm)
    unsigned long deflateBound(z_stream* strm, unsigned long source_len)
    int inflateInit2(z_stream* strm, int window_bits)
    int inflate(z_stream* strm, int flush)
    int inflateReset(z_stream* strm)
    int inflateEnd(z_stream* strm)

# Level 6 (zlib's default) on chat-sized messages: compressed once per
# broadcast, its bytes are saved once per member. Above DEFLATE_FAST_FROM
# (history pages, mostly) level 1: a quarter of the CPU for ~15% more bytes, so
# one large answer does not hold the loop for milliseconds. memLevel 4 keeps
# deflateReset cheap (it clears a hash table of 2**(memLevel + 8) bytes per
# message) at no measurable cost in size (figures: docs/protocol.md).
cdef enum:
    DEFLATE_LEVEL = 6
    DEFLATE_FAST_LEVEL = 1
    DEFLATE_FAST_FROM = 16384
    DEFLATE_MEM_LEVEL = 4
    PEEK_COMPRESSED = 1024      # compressed bytes inflated to learn a refused message's action and seq

cdef const char* _DEFLATE_TAIL = b"\x00\x00\xff\xff"   # RFC 7692 7.2.1: dropped by senders


cdef inline size_t _compressed_limit(size_t max_packet) noexcept nogil:
    """The largest compressed message accepted: deflate may grow incompressible
    data a little (zlib's compressBound), and the inflated size is checked anyway."""
    return max_packet + (max_packet >> 12) + (max_packet >> 14) + 64


cdef z_stream* _inflater(zcodec_t* z, size_t limit) noexcept nogil:
    """The reactor's inflater, reset, with z.inflated holding at least limit + 1 bytes."""
    cdef char* grown
    if z.inflated_cap < limit + 1:
        grown = <char*>realloc(z.inflated, limit + 1)
        if grown == NULL:
            return NULL
        z.inflated = grown
        z.inflated_cap = limit + 1
    if z.inflater == NULL:
        z.inflater = <z_stream*>calloc(1, sizeof(z_stream))
        if z.inflater == NULL:
            return NULL
        if inflateInit2(z.inflater, -15) != Z_OK:    # raw deflate; takes any window up to 15
            free(z.inflater)
            z.inflater = NULL
            return NULL
    else:
        inflateReset(z.inflater)
    return z.inflater


cdef Py_ssize_t _inflate(zcodec_t* z, const char* data, size_t n, size_t limit) noexcept nogil:
    """Inflate one message (data, then the tail the sender dropped) into
    z.inflated, stopping after limit + 1 bytes: a zip bomb costs no more memory
    than the largest allowed message. The size inflated, or -1: not deflate data."""
    cdef z_stream* zs = _inflater(z, limit)
    cdef int rc
    if zs == NULL:
        return -1
    zs.next_out = <unsigned char*>z.inflated
    zs.avail_out = <unsigned int>(limit + 1)
    zs.next_in = <const unsigned char*>data
    zs.avail_in = <unsigned int>n
    rc = inflate(zs, Z_SYNC_FLUSH)
    if (rc == Z_OK or rc == Z_BUF_ERROR) and zs.avail_out:
        zs.next_in = <const unsigned char*>_DEFLATE_TAIL
        zs.avail_in = 4
        rc = inflate(zs, Z_SYNC_FLUSH)
    if rc != Z_OK and rc != Z_STREAM_END and rc != Z_BUF_ERROR:
        return -1
    return <Py_ssize_t>(limit + 1 - zs.avail_out)


cdef int _refuse_deflated(char* buf, size_t length, size_t header, uint64_t plen, char* key,
                          ws_state_t* st, zcodec_t* z, packet_t* out) noexcept nogil:
    """EV_TOO_LARGE for a compressed message refused before its payload
    arrives: its action and seq are inflated from its first compressed bytes
    (gathered already, or at the start of this frame)."""
    cdef char head[PEEK_COMPRESSED]
    cdef const char* message = st.frag
    cdef size_t peek = st.frag_len
    if peek == 0:
        peek = plen if plen < PEEK_COMPRESSED else PEEK_COMPRESSED
        if length < header + peek:
            return EV_NEED_MORE
        memcpy(head, buf + header, peek)
        _unmask(head, peek, key)
        message = head
    if _inflate(z, message, peek, WS_PACKET_HEADER) < WS_PACKET_HEADER:
        return EV_BROKEN
    out.action = get16(z.inflated)
    out.seq = get16(z.inflated + 2)
    return EV_TOO_LARGE


cdef int _inflate_frame(char* payload, size_t plen, int fin, size_t max_packet, ws_state_t* st,
                        zcodec_t* z, packet_t* out) noexcept nogil:
    """A frame of a compressed message, unmasked: its frames are gathered
    compressed (like any fragmented message) and inflated once, at the final
    frame; a single frame is inflated straight from the read buffer."""
    cdef size_t limit = max_packet - WS_PACKET_HEADER
    cdef const char* message = payload
    cdef size_t message_len = plen
    cdef Py_ssize_t inflated
    if not fin or st.frag_active:
        if not _gather(st, payload, plen):
            return EV_BROKEN
        st.frag_deflated = 1
        if not fin:
            return EV_SKIP
        st.frag_active = 0
        st.frag_deflated = 0
        message = st.frag
        message_len = st.frag_len
    inflated = _inflate(z, message, message_len, limit)
    if inflated < 0:
        return EV_BAD_DEFLATE
    if inflated < WS_PACKET_HEADER:
        return EV_BROKEN
    out.action = get16(z.inflated)
    out.seq = get16(z.inflated + 2)
    if <size_t>inflated > limit:
        return EV_TOO_LARGE
    out.body = z.inflated + WS_PACKET_HEADER
    out.body_len = <size_t>inflated - WS_PACKET_HEADER
    return EV_PACKET


cdef size_t ws_deflate(zcodec_t* z, int action, int seq, const char* body, size_t body_len) noexcept nogil:
    """Compress one message (action, seq, body) into z.deflated with the
    reactor's deflater, as RFC 7692 wants it on the wire (no trailing 00 00 ff ff).
    Returns its length, or 0 when it should go out uncompressed: shorter than
    WS_DEFLATE_MIN, not made smaller, or no memory."""
    cdef char head[WS_PACKET_HEADER]
    cdef size_t bound, n
    cdef int level
    cdef char* grown
    cdef z_stream* zs
    if body_len + WS_PACKET_HEADER < WS_DEFLATE_MIN:
        return 0
    if z.deflater == NULL:
        z.deflater = <z_stream*>calloc(1, sizeof(z_stream))
        if z.deflater == NULL:
            return 0
        if deflateInit2(z.deflater, DEFLATE_LEVEL, Z_DEFLATED, -15, DEFLATE_MEM_LEVEL,
                        Z_DEFAULT_STRATEGY) != Z_OK:
            free(z.deflater)
            z.deflater = NULL
            return 0
        z.deflate_level = DEFLATE_LEVEL
    zs = z.deflater
    level = DEFLATE_LEVEL if body_len < DEFLATE_FAST_FROM else DEFLATE_FAST_LEVEL
    if level != z.deflate_level:        # cheap on a stream just reset: nothing to flush
        deflateParams(zs, level, Z_DEFAULT_STRATEGY)
        z.deflate_level = level
    bound = deflateBound(zs, body_len + WS_PACKET_HEADER) + 16     # + the sync flush's empty block
    if bound > z.deflated_cap:
        grown = <char*>realloc(z.deflated, bound)
        if grown == NULL:
            return 0
        z.deflated = grown
        z.deflated_cap = bound
    put16(head, action)
    put16(head + 2, seq)
    zs.next_out = <unsigned char*>z.deflated
    zs.avail_out = <unsigned int>bound
    zs.next_in = <const unsigned char*>head
    zs.avail_in = WS_PACKET_HEADER
    deflate(zs, Z_NO_FLUSH)
    zs.next_in = <const unsigned char*>body
    zs.avail_in = <unsigned int>body_len
    deflate(zs, Z_SYNC_FLUSH)
    n = bound - zs.avail_out
    deflateReset(zs)                    # no context takeover: the next message starts afresh
    if zs.avail_in or n < 4 or memcmp(z.deflated + n - 4, _DEFLATE_TAIL, 4) != 0:
        return 0                        # cannot happen with a bound this size; be safe
    n -= 4
    return n if n < body_len + WS_PACKET_HEADER else 0


cdef size_t ws_deflated_header(char* out, size_t payload_len) noexcept nogil:
    """A server frame header for a compressed binary message (FIN and RSV1 set)."""
    cdef size_t n = ws_frame_header(out, payload_len, OP_BINARY)
    out[0] = <char>(0xC0 | OP_BINARY)
    return n


cdef void zcodec_free(zcodec_t* z) noexcept nogil:
    if z.deflater != NULL:
        deflateEnd(z.deflater)
        free(z.deflater)
    if z.inflater != NULL:
        inflateEnd(z.inflater)
        free(z.inflater)
    free(z.deflated)
    free(z.inflated)
    z.deflater = z.inflater = NULL
    z.deflated = z.inflated = NULL
    z.deflated_cap = z.inflated_cap = 0


cdef void ws_release(ws_state_t* st) noexcept nogil:
    """Free the reassembly buffer (after its packet was handled, or at close)."""
    if not st.frag_active:
        st.frag_deflated = 0
        if st.frag != NULL:
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
_ORIGIN_REFUSED = b"origin not allowed (--ws-origins)\n"
_HTTP_403_ORIGIN = (b"HTTP/1.1 403 Forbidden\r\nConnection: close\r\nContent-Type: text/plain\r\n"
                    b"Content-Length: " + str(len(_ORIGIN_REFUSED)).encode() + b"\r\n\r\n" + _ORIGIN_REFUSED)
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_QUOTED = re.compile(r'"((?:[^"\\]|\\.)*)"')
_WINDOW_BITS = {str(bits): bits for bits in range(8, 16)}
_DEFLATE_PARAMS = ("server_no_context_takeover", "client_no_context_takeover",
                   "server_max_window_bits", "client_max_window_bits")


def _parse_extensions(str value):
    """A Sec-WebSocket-Extensions value as [(name, [(param, value or None)])]
    (RFC 6455 9.1), or None if it does not follow the grammar."""
    cdef list offers = [], params = None
    cdef Py_ssize_t pos = 0, end = len(value)
    cdef str param
    expect_name = True
    while True:
        while pos < end and value[pos] in " \t":
            pos += 1
        if pos == end:
            return offers if expect_name else None    # a trailing ';' has no parameter
        if expect_name and value[pos] == ",":       # empty list elements are allowed
            pos += 1
            continue
        token = _TOKEN.match(value, pos)
        if token is None:
            return None
        pos = token.end()
        if expect_name:
            params = []
            offers.append((token.group(), params))
        else:
            param = token.group()
            while pos < end and value[pos] in " \t":
                pos += 1
            if pos < end and value[pos] == "=":
                pos += 1
                while pos < end and value[pos] in " \t":
                    pos += 1
                quoted = _QUOTED.match(value, pos)
                if quoted is not None:
                    unquoted = re.sub(r"\\(.)", r"\1", quoted.group(1))
                    if _TOKEN.fullmatch(unquoted) is None:      # RFC 6455 9.1: a token once unquoted
                        return None
                    params.append((param, unquoted))
                    pos = quoted.end()
                else:
                    token = _TOKEN.match(value, pos)
                    if token is None:
                        return None
                    params.append((param, token.group()))
                    pos = token.end()
            else:
                params.append((param, None))
        while pos < end and value[pos] in " \t":
            pos += 1
        if pos == end:
            return offers
        if value[pos] == ";":
            expect_name = False
        elif value[pos] == ",":
            expect_name = True
        else:
            return None
        pos += 1


def negotiate_deflate(str offers):
    """Answer a client's Sec-WebSocket-Extensions value (RFC 7692 section 7).

    Returns (the response's extension value, the server window bits 8..15), or
    (None, 0) when no permessage-deflate offer in it can be accepted. The first
    acceptable offer wins; a malformed header, or an offer with an unknown,
    repeated or invalid parameter, is declined (the upgrade goes on without it).
    We always answer server_no_context_takeover and client_no_context_takeover:
    every message is its own deflate stream, so one deflater and one inflater per
    reactor serve every connection. A server_max_window_bits offer is honoured
    (messages longer than that window go out uncompressed); client_max_window_bits
    needs no answer, since the inflater takes any window.
    """
    parsed = _parse_extensions(offers)
    if parsed is None:
        return None, 0
    for name, params in parsed:
        if name != "permessage-deflate":
            continue
        seen = {}
        for param, value in params:
            if param not in _DEFLATE_PARAMS or param in seen:
                break
            if param.endswith("_takeover") and value is not None:
                break
            if param == "server_max_window_bits" and value not in _WINDOW_BITS:
                break
            if param == "client_max_window_bits" and value is not None and value not in _WINDOW_BITS:
                break
            seen[param] = value
        else:
            response = "permessage-deflate; server_no_context_takeover; client_no_context_takeover"
            bits = _WINDOW_BITS.get(seen.get("server_max_window_bits"), 15)
            if "server_max_window_bits" in seen:
                response += f"; server_max_window_bits={bits}"
            return response, bits
    return None, 0


cdef object ws_handshake(bytes request, bint deflate, object origins=None):
    """(the 101 answer, server window bits or 0) for a valid RFC 6455 upgrade
    request head, else None. ``deflate``: accept a permessage-deflate offer.
    ``origins``: None (any Origin), or a zim.origins.OriginPolicy whose
    ``allows(values)`` decides on the request's Origin header values; a valid
    request it refuses gets (the 403 answer, -1).

    Runs once per WebSocket connection, so plain Python parsing is fine here.
    """
    cdef list lines
    cdef list extensions = []
    cdef list origin_values = []
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
        name = name.strip().lower()
        headers[name] = value.strip()
        if name == "sec-websocket-extensions":     # may come in several lines
            extensions.append(value.strip())
        elif name == "origin":
            origin_values.append(value.strip())
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
    if origins is not None and not origins.allows(origin_values):
        return _HTTP_403_ORIGIN, -1
    accept = base64.b64encode(hashlib.sha1(key.encode() + _WS_GUID).digest())
    response = (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n")
    agreed, bits = negotiate_deflate(", ".join(extensions)) if deflate and extensions else (None, 0)
    if agreed is not None:
        response += b"Sec-WebSocket-Extensions: " + agreed.encode() + b"\r\n"
    return response + b"\r\n", bits


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


def handshake_response(bytes request, bint deflate=True, object origins=None):
    """The 101 response for a WebSocket upgrade request head (or the 403 for an
    Origin ``origins`` refuses), or None."""
    answer = ws_handshake(request, deflate, origins)
    return None if answer is None else answer[0]


def deflate_message(int action, int seq, bytes body):
    """The payload of the server's compressed frame for a message, or None when
    it goes out uncompressed (ws_deflate, with a deflater of its own)."""
    cdef zcodec_t z
    cdef size_t n
    memset(&z, 0, sizeof(z))
    n = ws_deflate(&z, action, seq, body, len(body))
    payload = z.deflated[:n] if n else None
    zcodec_free(&z)
    return payload


def deflate_repeat(bytes body, int count):
    """Compress the same push ``count`` times with one deflater, as a reactor
    does (for measuring the CPU cost per message); the compressed length."""
    cdef zcodec_t z
    cdef size_t n = 0
    cdef int i
    cdef const char* data = body
    cdef size_t length = len(body)
    memset(&z, 0, sizeof(z))
    with nogil:
        for i in range(count):
            n = ws_deflate(&z, 102, 0, data, length)
    zcodec_free(&z)
    return n


def encode_ws_deflated(bytes payload):
    """One server frame carrying a compressed message (RSV1 set)."""
    cdef char head[WS_MAX_FRAME_HEADER]
    cdef size_t n = ws_deflated_header(head, len(payload))
    return head[:n] + payload


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
    """The reactor's ws_next() on client frames, for tests; ``deflate``: as on a
    connection that negotiated permessage-deflate."""
    cdef ws_state_t st
    cdef zcodec_t z
    cdef bint deflate

    def __init__(self, size_t max_packet=65536, bint deflate=False):
        super().__init__(max_packet)
        self.deflate = deflate

    def __dealloc__(self):
        self.st.frag_active = 0
        ws_release(&self.st)
        zcodec_free(&self.z)

    cdef object _next(self, char* buf, size_t length, size_t* consumed):
        cdef packet_t pkt
        cdef int ev = ws_next(buf, length, self.max_packet, &self.st, &self.z if self.deflate else NULL,
                              &pkt, consumed)
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
        if ev == EV_BAD_UTF8 or ev == EV_BAD_DEFLATE:
            return ("error", 1007)
        if ev == EV_BROKEN:
            return ("error", 1002)
        return None
