# The wire codec, shared by the reactor (zim/_core.pyx) and the tests.
# Decoders work in place on a caller's buffer and never allocate, except to
# reassemble a fragmented WebSocket message (ws_state_t.frag).
from libc.stdint cimport uint8_t, uint32_t, uint64_t

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

    TCP_HEADER = 8      # length(4) action(2) seq(2)
    WS_PACKET_HEADER = 4  # action(2) seq(2) at the start of a WebSocket message
    WS_MAX_FRAME_HEADER = 14
    WS_MAX_CONTROL = 125

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

cdef int tcp_next(char* buf, size_t length, size_t max_packet,
                  packet_t* out, size_t* consumed) noexcept nogil
cdef int ws_next(char* buf, size_t length, size_t max_packet, ws_state_t* st,
                 packet_t* out, size_t* consumed) noexcept nogil
cdef void ws_release(ws_state_t* st) noexcept nogil

cdef size_t tcp_header(char* out, size_t body_len, int action, int seq) noexcept nogil
cdef size_t ws_frame_header(char* out, size_t payload_len, int opcode) noexcept nogil
cdef size_t ws_packet_header(char* out, size_t body_len, int action, int seq) noexcept nogil

cdef bytes ws_handshake_response(bytes request)
cdef Py_ssize_t find_header_end(const char* buf, size_t length) noexcept nogil


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
