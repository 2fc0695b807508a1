# permessage-deflate (RFC 7692) with no context takeover either way: the
# negotiation answered in the upgrade, inflating a client's compressed message
# (single frame or gathered fragments, bounded by the max packet) and
# compressing the server's with the reactor's one deflater (zcodec_t). The same
# deflater compresses the bodies of TCP packets to clients that asked at login
# (tcp_deflate; docs/protocol.md, "Compression on TCP").
# zlib's declarations are in zim/includes/zlib.pxd. Included by zim/_codec.pyx.
from zim.includes.zlib cimport (
    Z_OK, Z_STREAM_END, Z_BUF_ERROR, Z_NO_FLUSH, Z_SYNC_FLUSH, Z_FINISH, Z_DEFLATED, Z_DEFAULT_STRATEGY,
    deflateInit2, deflate, deflateReset, deflateParams, deflateEnd, deflateBound,
    inflateInit2, inflate, inflateReset, inflateEnd,
)


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


cdef z_stream* _deflater(zcodec_t* z, size_t length) noexcept nogil:
    """The reactor's deflater, set for an input of ``length`` bytes: at the
    level for that size, writing to z.deflated with room for deflate's worst
    case (z.deflated_cap bytes, at least deflateBound + 16 for a flush block).
    NULL: no memory. The caller resets it after one message."""
    cdef size_t bound
    cdef int level
    cdef char* grown
    cdef z_stream* zs
    if z.deflater == NULL:
        z.deflater = <z_stream*>calloc(1, sizeof(z_stream))
        if z.deflater == NULL:
            return NULL
        if deflateInit2(z.deflater, DEFLATE_LEVEL, Z_DEFLATED, -15, DEFLATE_MEM_LEVEL,
                        Z_DEFAULT_STRATEGY) != Z_OK:
            free(z.deflater)
            z.deflater = NULL
            return NULL
        z.deflate_level = DEFLATE_LEVEL
    zs = z.deflater
    level = DEFLATE_LEVEL if length < DEFLATE_FAST_FROM else DEFLATE_FAST_LEVEL
    if level != z.deflate_level:        # cheap on a stream just reset: nothing to flush
        deflateParams(zs, level, Z_DEFAULT_STRATEGY)
        z.deflate_level = level
    bound = deflateBound(zs, length) + 16
    if bound > z.deflated_cap:
        grown = <char*>realloc(z.deflated, bound)
        if grown == NULL:
            return NULL
        z.deflated = grown
        z.deflated_cap = bound
    zs.next_out = <unsigned char*>z.deflated
    zs.avail_out = <unsigned int>z.deflated_cap
    return zs


cdef size_t ws_deflate(zcodec_t* z, int action, int seq, const char* body, size_t body_len) noexcept nogil:
    """Compress one message (action, seq, body) into z.deflated with the
    reactor's deflater, as RFC 7692 wants it on the wire (no trailing 00 00 ff ff).
    Returns its length, or 0 when it should go out uncompressed: shorter than
    WS_DEFLATE_MIN, not made smaller, or no memory."""
    cdef char head[WS_PACKET_HEADER]
    cdef size_t n
    cdef z_stream* zs
    if body_len + WS_PACKET_HEADER < WS_DEFLATE_MIN:
        return 0
    zs = _deflater(z, body_len + WS_PACKET_HEADER)
    if zs == NULL:
        return 0
    put16(head, action)
    put16(head + 2, seq)
    zs.next_in = <const unsigned char*>head
    zs.avail_in = WS_PACKET_HEADER
    deflate(zs, Z_NO_FLUSH)
    zs.next_in = <const unsigned char*>body
    zs.avail_in = <unsigned int>body_len
    deflate(zs, Z_SYNC_FLUSH)
    n = z.deflated_cap - zs.avail_out
    deflateReset(zs)                    # no context takeover: the next message starts afresh
    if zs.avail_in or n < 4 or memcmp(z.deflated + n - 4, _DEFLATE_TAIL, 4) != 0:
        return 0                        # cannot happen with a bound this size; be safe
    n -= 4
    return n if n < body_len + WS_PACKET_HEADER else 0


cdef size_t tcp_deflate(zcodec_t* z, const char* body, size_t body_len, size_t min_len) noexcept nogil:
    """Compress one TCP packet's body into z.deflated: raw DEFLATE (RFC 1951),
    its own stream ending in a final block, as a client that asked for
    compression at login inflates it. Returns its length, or 0 when the body
    goes out plain: shorter than ``min_len`` (--tcp-deflate-min), not made
    smaller, or no memory."""
    cdef size_t n
    cdef int rc
    cdef z_stream* zs
    if body_len < min_len or body_len == 0:
        return 0
    zs = _deflater(z, body_len)
    if zs == NULL:
        return 0
    zs.next_in = <const unsigned char*>body
    zs.avail_in = <unsigned int>body_len
    rc = deflate(zs, Z_FINISH)
    n = z.deflated_cap - zs.avail_out
    deflateReset(zs)                    # every body is a stream of its own
    if rc != Z_STREAM_END:
        return 0                        # cannot happen with a bound this size; be safe
    return n if n < body_len else 0


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


# The negotiation (RFC 7692 section 7), run by ws_handshake (handshake.pxi) once per upgrade.
_WINDOW_BITS = {str(bits): bits for bits in range(8, 16)}
_DEFLATE_PARAMS = ("server_no_context_takeover", "client_no_context_takeover",
                   "server_max_window_bits", "client_max_window_bits")


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
