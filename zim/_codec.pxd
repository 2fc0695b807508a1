# The wire codec, shared by the reactor (zim/_core.pyx) and the tests: the
# declarations of zim/_codec.pyx and the files it includes (zim/codec/*.pxi).
# Decoders work in place on a caller's buffer and never allocate, except to
# reassemble a fragmented WebSocket message (ws_state_t.frag).
from libc.stdint cimport uint8_t, uint32_t, uint64_t

from zim.includes.zlib cimport z_stream

cdef enum:
    EV_NEED_MORE = 0    # no complete unit in the buffer yet
    EV_PACKET = 1       # out.action/seq/body are set
    EV_TOO_LARGE = 2    # out.action/seq are set; answer too_large, then close (1009)
    EV_BROKEN = 3       # framing violation: close without a response (1002)
    EV_PING = 4         # out.body is the ping payload
    EV_PONG = 5
    EV_CLOSE = 6        # out.close_code (0: none given), out.body the reason
    EV_TEXT = 7         # a text message: close 1003
    EV_SKIP = 8         # consumed a fragment; nothing to hand on yet
    EV_BAD_UTF8 = 9     # a close reason that is not UTF-8: close 1007
    EV_BAD_DEFLATE = 10 # a compressed message that does not inflate: close 1007

    TCP_HEADER = 8      # length(4) action(2) seq(2)
    WS_PACKET_HEADER = 4  # action(2) seq(2) at the start of a WebSocket message
    WS_MAX_FRAME_HEADER = 14
    WS_MAX_CONTROL = 125
    WS_DEFLATE_MIN = 64   # shorter messages go out uncompressed (see docs/protocol.md)
    SEQ_DEFLATED = 0x8000 # a TCP packet's seq bit 15: its body is compressed (tcp_deflate)


cdef inline bint ws_deflate_fits(uint8_t window_bits, size_t message_len) noexcept nogil:
    """Whether our compressed form of a message suits a client that allows the
    server a window of 2**window_bits (0: no deflate). Every message is its own
    deflate stream, so no match reaches further back than the message is long."""
    return window_bits == 15 or (window_bits != 0 and message_len <= (<size_t>1 << window_bits))

cdef struct packet_t:
    int action
    int seq
    char* body
    size_t body_len
    int close_code

# Per-connection WebSocket state: kept tiny because it lives in every
# connection slot. frag is NULL unless a fragmented message is in flight.
cdef struct ws_state_t:
    char* frag
    uint32_t frag_len
    uint8_t frag_active
    uint8_t frag_deflated   # the message in flight is compressed (RSV1 on its first frame)


# permessage-deflate (RFC 7692) with no context takeover either way: every
# message is its own deflate stream, so one deflater and one inflater per
# reactor serve all connections (nothing per connection but the window bits).
# TCP's compressed bodies (tcp_deflate) use the same deflater, one stream each.
# Both streams are made on first use; a reactor with no deflate client has none.
cdef struct zcodec_t:
    z_stream* deflater
    z_stream* inflater
    int deflate_level       # the deflater's current level (it depends on the message size)
    char* deflated          # the last compressed message (ws_deflate) or body (tcp_deflate)
    size_t deflated_cap
    char* inflated          # the last inflated message; a packet's body points here
    size_t inflated_cap

cdef int tcp_next(char* buf, size_t length, size_t max_packet,
                  packet_t* out, size_t* consumed) noexcept nogil
cdef int ws_next(char* buf, size_t length, size_t max_packet, ws_state_t* st,
                 zcodec_t* z, packet_t* out, size_t* consumed) noexcept nogil
cdef void ws_release(ws_state_t* st) noexcept nogil
cdef size_t ws_deflate(zcodec_t* z, int action, int seq, const char* body, size_t body_len) noexcept nogil
cdef size_t ws_deflated_header(char* out, size_t payload_len) noexcept nogil
cdef size_t tcp_deflate(zcodec_t* z, const char* body, size_t body_len, size_t min_len) noexcept nogil
cdef void zcodec_free(zcodec_t* z) noexcept nogil

cdef size_t tcp_header(char* out, size_t body_len, int action, int seq) noexcept nogil
cdef size_t ws_frame_header(char* out, size_t payload_len, int opcode) noexcept nogil
cdef size_t ws_packet_header(char* out, size_t body_len, int action, int seq) noexcept nogil

cdef object ws_handshake(bytes request, bint deflate, object origins=*)
cdef Py_ssize_t find_header_end(const char* buf, size_t length) noexcept nogil

# Plain GETs on the WebSocket port (codec/static.pxi): paths whose responses the reactor holds
cdef struct path_t:
    const char* text        # in a bytes object the table's owner keeps
    size_t length

cdef struct static_table_t:
    path_t* paths           # NULL while there is no table
    size_t count

cdef Py_ssize_t static_lookup(const static_table_t* table, const char* head, size_t length) noexcept nogil
cdef tuple static_table_set(static_table_t* table, dict pages)
cdef void static_table_free(static_table_t* table) noexcept nogil


# Big-endian field access, shared by the codec and the reactor's link packets.
cdef inline uint32_t get32(const char* p) noexcept nogil:
    cdef const uint8_t* u = <const uint8_t*>p
    return (<uint32_t>u[0] << 24) | (<uint32_t>u[1] << 16) | (<uint32_t>u[2] << 8) | u[3]

cdef inline int get16(const char* p) noexcept nogil:
    cdef const uint8_t* u = <const uint8_t*>p
    return (u[0] << 8) | u[1]

cdef inline uint64_t get64(const char* p) noexcept nogil:
    return (<uint64_t>get32(p) << 32) | get32(p + 4)

cdef inline void put16(char* p, int v) noexcept nogil:
    p[0] = <char>((v >> 8) & 0xFF)
    p[1] = <char>(v & 0xFF)

cdef inline void put32(char* p, uint32_t v) noexcept nogil:
    put16(p, <int>(v >> 16))
    put16(p + 2, <int>(v & 0xFFFF))

cdef inline void put64(char* p, uint64_t v) noexcept nogil:
    put32(p, <uint32_t>(v >> 32))
    put32(p + 4, <uint32_t>(v & 0xFFFFFFFFU))
