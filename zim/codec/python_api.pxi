# The Python surface of the C codec: the same cdef functions the reactor calls,
# wrapped for callers that are not the reactor. They exist for
#  - the storage writer's link (zim/storage/writer.py) and zim-connflood
#    (zim/connflood.py), which frame TCP packets with encode_tcp and read them
#    with TcpDecoder;
#  - the codec's unit tests (tests/core/test_codec.py,
#    tests/protocol/test_ws_deflate.py, test_tcp_deflate.py), which drive the reactor's decoders
#    through TcpDecoder/WsDecoder and check the server's frames;
#  - bench/wire_bytes.py, which times the reactor's deflater (deflate_repeat).
# Nothing here is on the hot path. Included by zim/_codec.pyx.


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


def deflate_tcp_body(bytes body, size_t min_len=WS_DEFLATE_MIN):
    """What the reactor sends as the body of a compressed TCP packet for
    ``body`` (raw DEFLATE), or None when it goes out plain (tcp_deflate, with a
    deflater of its own; ``min_len`` as --tcp-deflate-min)."""
    cdef zcodec_t z
    cdef size_t n
    memset(&z, 0, sizeof(z))
    n = tcp_deflate(&z, body, len(body), min_len)
    compressed = z.deflated[:n] if n else None
    zcodec_free(&z)
    return compressed


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
