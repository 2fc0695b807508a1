# TCP framing: every packet is length(4) action(2) seq(2) body, big-endian,
# where length counts the whole packet (docs/protocol.md). Included by
# zim/_codec.pyx; declared in zim/_codec.pxd.


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
