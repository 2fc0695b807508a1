# WebSocket framing (RFC 6455): decoding the client's masked frames in place
# (control frames, fragments, the size check before the payload arrives) and
# writing the server's unmasked frame headers. A compressed message is handed
# to permessage-deflate (deflate.pxi); the upgrade itself is in handshake.pxi.
# Included by zim/_codec.pyx; declared in zim/_codec.pxd.


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
