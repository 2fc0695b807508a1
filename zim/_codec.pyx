# cython: language_level=3
"""The wire codec: TCP length-prefixed packets and RFC 6455 WebSocket frames.

One extension, laid out by concept the way uvloop is: each part is a file
included here, and every declaration the reactor (zim/_core.pyx) cimports is in
zim/_codec.pxd.

- codec/tcp.pxi: TCP framing (tcp_next, tcp_header);
- codec/websocket.pxi: WebSocket framing (ws_next, ws_release, frame headers);
- codec/deflate.pxi: permessage-deflate (RFC 7692): its negotiation, inflating
  client messages and compressing ours; and the compressed bodies of TCP
  packets (tcp_deflate) (zlib's declarations: includes/zlib.pxd);
- codec/handshake.pxi: the upgrade request and its 101 (or 403) answer;
- codec/static.pxi: plain GETs on the WebSocket port answered from a table (--demo);
- codec/python_api.pxi: the same functions wrapped for Python (TcpDecoder,
  WsDecoder, encode_tcp, ...): the storage writer's link and the codec's tests.

The ``cdef`` functions are what the reactor calls on its read buffer; they work
in place and never allocate, except to reassemble a fragmented WebSocket
message or to inflate a compressed one.
"""
from libc.stdint cimport uint8_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free, malloc, realloc
from libc.string cimport memcpy, memcmp, memset

include "codec/tcp.pxi"
include "codec/websocket.pxi"
include "codec/deflate.pxi"
include "codec/handshake.pxi"
include "codec/static.pxi"
include "codec/python_api.pxi"
