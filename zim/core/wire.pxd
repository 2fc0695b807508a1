# The router <-> worker link, defined once: the command numbers, the event kinds, the
# handle bits and the fixed heads of what the core packs and reads in C. The router and
# the worker run the same core, so both ends read these names; zim._core exposes the
# cpdef ones to Python for the packing done there.
#
# A link packet is an ordinary TCP-framed packet (length, action, seq, body) between zim
# processes. Router -> worker: a command, its number in the action field; REPLY,
# PUSH_USER and BROADCAST are carried out in C (core/link.pyx), the others in Python.
# Worker -> router: a client's request, forwarded with a REQUEST head before its body
# and its own action and seq; or an event, action EVENT, its kind in the seq field.
from libc.stdint cimport uint32_t, uint64_t

cpdef enum:
    CMD_REPLY = 1               # head REPLY_HEAD, then the packet's body
    CMD_PUSH_USER = 2           # head PUSH_USER_HEAD, then the push's body
    CMD_BROADCAST = 3           # head BROADCAST_HEAD, then the push's body
    CMD_BIND = 4
    CMD_FOLLOW = 5
    CMD_UNFOLLOW = 6
    CMD_CLOSE = 7
    CMD_BROADCAST_EXCEPT = 8
    CMD_CLOSE_USER = 9
    CMD_TCP_DEFLATE = 10        # a TCP login agreed on compression: what follows its answer may be
    EVENT = 0
    EVENT_USER_GONE = 1
    EVENT_LISTENING = 2
    EVENT_USERS_CLOSED = 3
    # A worker's connection handle fits HANDLE_BITS bits: the router's connection id puts
    # the worker index above them (LINK_HANDLE_MASK = (1 << HANDLE_BITS) - 1 takes it off).
    HANDLE_BITS = 56
    # The user field of a forwarded request: a user id (below 2**63), or, for a connection
    # not logged in, PEER_MARK = 1 << PEER_BIT | its address key (Server.serve tells them apart).
    PEER_BIT = 63
    PEER_WS_BIT = 62            # ... and for a WebSocket one, 1 << PEER_WS_BIT too (else TCP)
    # The fixed heads, in bytes
    REQUEST_HEAD = 16           # conn(8) user(8)
    REPLY_HEAD = 13             # conn(8) action(2) seq(2) response(1)
    PUSH_USER_HEAD = 18         # user(8) exclude(8) action(2)
    BROADCAST_HEAD = 14         # group(4) exclude(8) action(2)
    USERS_CLOSED_ENTRY = 8      # EVENT_USERS_CLOSED's body: user ids of 8 bytes, one per connection

# Where each field of those heads starts (big-endian, as every field on the wire)
cdef enum:
    REQUEST_CONN = 0            # the worker's connection handle
    REQUEST_USER = 8            # its user id, or PEER_MARK | address key (| PEER_WS)
    REPLY_CONN = 0
    REPLY_ACTION = 8
    REPLY_SEQ = 10
    REPLY_RESPONSE = 12         # 1: the answer to a forwarded request (it is no longer in flight)
    PUSH_USER_USER = 0
    PUSH_USER_EXCLUDE = 8       # a connection handle left out (0: none)
    PUSH_USER_ACTION = 16
    BROADCAST_GROUP = 0
    BROADCAST_EXCLUDE = 4       # a connection handle left out (0: none)
    BROADCAST_ACTION = 12

# A link's packets may be far larger than a client's (see link_packet_limit)
cdef enum:
    LINK_PACKET_FLOOR = 64 * 1024 * 1024


cdef inline uint64_t router_conn(uint64_t worker_index, uint64_t handle) noexcept nogil:
    """A worker's connection handle as the router names it: the worker index above its bits."""
    return (worker_index << HANDLE_BITS) | (handle & ((<uint64_t>1 << HANDLE_BITS) - 1))


cdef inline uint64_t peer_field(uint32_t peer, bint websocket) noexcept nogil:
    """A forwarded request's user field for a connection not logged in: its address
    key, marked, with its transport (a login asking for TCP compression needs it)."""
    return ((<uint64_t>1) << PEER_BIT) | ((<uint64_t>websocket) << PEER_WS_BIT) | peer
