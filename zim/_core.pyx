# cython: language_level=3
"""The reactor: one edge-triggered epoll loop per worker process.

Per connection there is one fixed-size C struct in a table indexed by fd (no
Python object). Input is read into one per-worker scratch buffer and parsed in
place; only a trailing partial packet is kept, in a malloc'd buffer freed as
soon as it is consumed. Output is appended to a per-connection buffer and
flushed once per loop iteration with a single write carrying everything
queued (the kernel charges per call, not per byte: docs/architecture.md).
A channel broadcast is framed once into the group's pass buffer; members with
nothing else queued are written straight from it (see pass_out_t).
Python is called once per complete request packet.
"""
from libc.stdint cimport int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free, malloc, qsort, realloc
from libc.string cimport memcpy, memmove, memset
from libc.stdio cimport snprintf
from libc.errno cimport errno, EAGAIN, EINTR, EMFILE, ENFILE, ENOBUFS, ENOMEM
from posix.unistd cimport close, read, write
from posix.fcntl cimport open as c_open, O_RDONLY, O_CLOEXEC
from posix.time cimport clock_gettime, timespec, CLOCK_MONOTONIC
from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING, PyBytes_GET_SIZE
from cpython.exc cimport PyErr_CheckSignals

from zim._idmap cimport idmap_t, idmap_init, idmap_free, idmap_find, idmap_insert, idmap_delete
from zim._codec cimport (
    packet_t, ws_state_t, zcodec_t, tcp_next, ws_next, ws_release, tcp_header,
    get16, get32, get64, put16, put32, put64,
    ws_frame_header, ws_packet_header, ws_handshake, find_header_end,
    ws_deflate, ws_deflate_fits, ws_deflated_header, zcodec_free,
    EV_NEED_MORE, EV_PACKET, EV_TOO_LARGE, EV_BROKEN, EV_PING, EV_PONG,
    EV_CLOSE, EV_TEXT, EV_SKIP, EV_BAD_UTF8, EV_BAD_DEFLATE, TCP_HEADER, WS_MAX_FRAME_HEADER,
    WS_PACKET_HEADER,
)

import logging
import os
import socket

log = logging.getLogger("zim.core")

cdef extern from "sys/epoll.h" nogil:
    ctypedef union epoll_data_t:
        void* ptr
        int fd
        uint32_t u32
        uint64_t u64
    cdef struct epoll_event:
        uint32_t events
        epoll_data_t data
    int epoll_create1(int flags)
    int epoll_ctl(int epfd, int op, int fd, epoll_event* event)
    int epoll_wait(int epfd, epoll_event* events, int maxevents, int timeout)
    enum:
        EPOLL_CLOEXEC, EPOLL_CTL_ADD, EPOLL_CTL_MOD, EPOLL_CTL_DEL
        EPOLLIN, EPOLLOUT, EPOLLRDHUP, EPOLLHUP, EPOLLERR, EPOLLET

cdef extern from "sys/socket.h" nogil:
    ctypedef unsigned int socklen_t
    struct sockaddr:
        pass
    struct sockaddr_storage:
        unsigned short ss_family
    int accept4(int fd, sockaddr* addr, socklen_t* addrlen, int flags)
    int shutdown(int fd, int how)
    int setsockopt(int fd, int level, int optname, const void* optval, socklen_t optlen)
    enum:
        SOCK_NONBLOCK, SOCK_CLOEXEC, SHUT_WR

cdef extern from "netinet/in.h" nogil:
    enum:
        IPPROTO_TCP, AF_INET, AF_INET6
    struct in_addr:
        uint32_t s_addr
    struct sockaddr_in:
        unsigned short sin_family
        in_addr sin_addr
    struct in6_addr:
        unsigned char s6_addr[16]
    struct sockaddr_in6:
        unsigned short sin6_family
        in6_addr sin6_addr
    uint32_t ntohl(uint32_t value)

cdef extern from "sys/mman.h" nogil:
    int madvise(void* addr, size_t length, int advice)
    enum:
        MADV_REMOVE

cdef extern from "netinet/tcp.h" nogil:
    enum:
        TCP_NODELAY

cdef extern from "malloc.h" nogil:
    int mallopt(int param, int value)
    enum:
        M_TRIM_THRESHOLD

cdef extern from "sys/resource.h" nogil:
    struct rlimit:
        unsigned long rlim_cur
        unsigned long rlim_max
    int getrlimit(int resource, rlimit* rlim)
    enum:
        RLIMIT_NOFILE

# Connection states
cdef enum:
    S_FREE = 0
    S_LISTEN_TCP = 1
    S_LISTEN_WS = 2
    S_WATCH = 3         # a descriptor of the owner's (eventfd, pipe): a callback when readable
    S_TCP = 4           # connections from here on
    S_WS_HANDSHAKE = 5
    S_WS = 6

# Connection flags
cdef enum:
    F_PENDING = 1       # in the flush list for this iteration
    F_EPOLLOUT = 2      # EPOLLOUT armed: the kernel did not take everything
    F_CLOSING = 4       # no more requests: flush, half-close, drain, close
    F_SHUT = 8          # write side shut down; draining input until EOF
    F_PEER_EOF = 16     # peer closed its side: close once output is flushed
    F_READ_AGAIN = 32   # read budget spent before EAGAIN: resume next iteration
    F_LINK = 64         # a trusted link to another zim process: no timeouts, caps or limits
    F_PAUSED = 128      # requests held (e.g. while a login is being decided elsewhere)
    F_FINAL_TOO_LARGE = 256     # answer final_action/final_seq with too_large before closing
    F_SHARED = 512      # outbuf points at a pass_out_t: outcap is the start, outlen the length
    F_SHARED_DEFLATE = 1024     # ... and the slice is in its compressed framing (FRAMING_DEFLATE)
    F_LOGGING_IN = 2048 # a login (action 1) of a connection not logged in waits for its answer
    F_COUNTED = 4096    # counted in the address table (--max-conns-per-address) under its peer key

cdef enum:
    MAX_EVENTS = 1024
    READS_PER_EVENT = 16        # fairness: a flooding peer yields after this many reads
    MAX_HANDSHAKE = 8192
    DRAIN_SECONDS = 5           # how long a closing connection may take to send EOF
    ACTION_LOGIN = 1            # the protocol's login: the one request the login timeout waits for
    NO_CONN = -1
    WHEEL_SLOTS = 1024          # timing wheel: one slot per second, lazily re-armed
    CLOSED_USERS_PART = 1 << 20     # user ids per on_users_closed call (8 MiB, under a link's limit)

DEF_OUTBUF_LIMIT = 8 * 1024 * 1024
DEF_MAX_INFLIGHT = 128

# Why a connection was closed (conn_t.close_reason, set by the first decision to close it;
# unset means the peer closed or broke it). Counted by reason at the close.
cdef enum:
    R_PEER = 0
    R_LOGIN_TIMEOUT = 1
    R_IDLE_TIMEOUT = 2
    R_TOO_LARGE = 3
    R_PROTOCOL_ERROR = 4
    R_OUTPUT_CAP = 5
    R_FD_LIMIT = 6          # refused at accept: never a connection, counted directly
    R_SHUTDOWN = 7
    R_SERVER = 8            # closed by the application (Reactor.close)
    R_NO_MEMORY = 9
    R_MEMORY_BUDGET = 10    # the worker's output queues passed --max-client-memory: largest cut first
    R_ORIGIN = 11           # a WebSocket handshake from an Origin not in --ws-origins
    R_ADDRESS_LIMIT = 12    # refused at accept: its address has --max-conns-per-address already
    CLOSE_REASONS = 13

CLOSE_REASON_NAMES = ("peer", "login_timeout", "idle_timeout", "too_large", "protocol_error",
                      "output_cap", "fd_limit", "shutdown", "server", "no_memory", "memory_budget",
                      "origin", "address_limit")

# The reactor's metric counters: one flat uint64 array (Reactor.share_counters can move it
# into memory another process reads), so counting costs one add and no Python object.
# Client connections only: the links between zim's own processes are counted apart.
cdef enum:
    REQUEST_ACTIONS = 16            # actions counted one by one; the rest as "other"
    C_ACCEPTED = 0
    C_CLOSED = 1                    # + reason: C_CLOSED .. C_CLOSED + CLOSE_REASONS - 1
    C_REQUESTS = C_CLOSED + CLOSE_REASONS       # + action for actions 0..15; + 16: any other
    C_ERR_UNKNOWN_ACTION = C_REQUESTS + REQUEST_ACTIONS + 1     # refusals answered in C (workers)
    C_ERR_NOT_LOGGED_IN
    C_ERR_NO_ROUTER
    C_DELIVERIES_USER               # push packets queued to connections
    C_DELIVERIES_CHANNEL
    C_BYTES_IN
    C_BYTES_OUT
    C_LINK_BYTES_IN
    C_LINK_BYTES_OUT
    C_DEFLATED_OUT
    C_INFLATED_IN
    C_PACKETS_IN
    # gauges: values now, not totals
    C_CONNECTIONS_TCP               # WebSocket ones count as ws from accept, handshake included
    C_CONNECTIONS_WS
    C_LOGGED_IN
    C_LINKS
    C_OUTBUF_BYTES                  # refreshed once a second (a table scan, off the hot path)
    C_OUTBUF_MAX_BYTES
    C_LINK_QUEUE_BYTES
    N_COUNTERS
    FIRST_GAUGE = C_CONNECTIONS_TCP

COUNTER_NAMES = (
    ("accepted",) + tuple("closed_" + name for name in CLOSE_REASON_NAMES)
    + tuple(f"requests_action_{action}" for action in range(REQUEST_ACTIONS)) + ("requests_action_other",)
    + ("errors_unknown_action", "errors_not_logged_in", "errors_internal",
       "deliveries_user", "deliveries_channel", "bytes_in", "bytes_out", "link_bytes_in",
       "link_bytes_out", "deflated_out", "inflated_in", "packets_in",
       "connections_tcp", "connections_ws", "logged_in", "links", "outbuf_bytes", "outbuf_max_bytes",
       "link_queue_bytes")
)
GAUGE_NAMES = frozenset(COUNTER_NAMES[FIRST_GAUGE:])
COUNTER_BYTES = N_COUNTERS * 8
assert len(COUNTER_NAMES) == N_COUNTERS and COUNTER_NAMES[C_LINK_QUEUE_BYTES] == "link_queue_bytes"
assert len(CLOSE_REASON_NAMES) == CLOSE_REASONS and COUNTER_NAMES[FIRST_GAUGE] == "connections_tcp"

# Canned responses (C-side: sent without a Python call)
_TOO_LARGE_BODY = b'{"error":{"code":"too_large","message":"packet exceeds the server\'s max packet size"}}'
_NOT_LOGGED_IN_BODY = b'{"error":{"code":"not_logged_in","message":"log in first (action 1)"}}'
_INTERNAL_BODY = b'{"error":{"code":"internal","message":"the router is not reachable"}}'
_HTTP_400 = b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"


# One slot per fd. Kept small: it is the whole per-connection cost in user
# space for an idle connection (buffers are NULL while empty).
cdef struct conn_t:
    uint32_t gen            # bumped at accept (24 bits): handles of a closed fd go stale
    uint16_t flags
    uint8_t state
    uint8_t deflate_bits    # permessage-deflate: the server window bits agreed (8..15), 0: off
    uint64_t user           # 0: not logged in
    char* inbuf             # trailing partial input, NULL when none
    char* outbuf            # bytes the kernel has not taken yet, NULL when none;
                            # with F_SHARED, a slice of a group's broadcasts (pass_out_t)
    uint32_t inlen
    uint32_t outlen
    uint32_t outcap
    int32_t next_dev        # next connection of the same user (presence list)
    ws_state_t ws
    uint32_t last_active    # monotonic seconds of the last byte received
    uint32_t born           # monotonic seconds at accept (login timeout)
    int32_t wheel_prev      # timing-wheel slot list links (fds)
    int32_t wheel_next
    uint16_t wheel_slot     # the timing-wheel slot holding it
    uint16_t inflight       # requests handed to another process, not yet answered
    uint16_t close_code     # WebSocket close to send once every answer is out
    uint16_t final_action   # too_large answer to send last (F_FINAL_TOO_LARGE)
    uint16_t final_seq
    uint8_t close_reason    # R_*: why the server decided to close it (R_PEER: it did not)
    uint32_t peer           # the client's address key (peer_key; 0: none), in what was padding


# A growable list of connection handles; entries may go stale (checked on use).
cdef struct handle_list_t:
    uint64_t* items
    size_t length
    size_t capacity


cdef void handles_push(handle_list_t* hl, uint64_t handle) noexcept nogil:
    cdef uint64_t* grown
    if hl.length == hl.capacity:
        grown = <uint64_t*>realloc(hl.items, (hl.capacity * 2 + 64) * sizeof(uint64_t))
        if grown == NULL:
            return                      # losing a mark only delays work to the next event
        hl.items = grown
        hl.capacity = hl.capacity * 2 + 64
    hl.items[hl.length] = handle
    hl.length += 1


cdef handle_list_t handles_take(handle_list_t* hl) noexcept nogil:
    """Move the list out, leaving an empty one for work queued meanwhile."""
    cdef handle_list_t taken = hl[0]
    hl.items = NULL
    hl.length = hl.capacity = 0
    return taken


cdef struct shared_buf_t:
    char* data
    uint32_t length
    uint32_t capacity


# A group's broadcasts of one loop pass, framed once per framing. A member with
# nothing else queued is written straight from here (its slice: F_SHARED), so a
# message is not copied into a thousand connection buffers to be written once
# from each; a member that gets anything else first takes a private copy.
cdef enum:
    FRAMING_TCP = 0
    FRAMING_WS = 1
    FRAMING_DEFLATE = 2     # WebSocket, compressed: the same bytes for every deflate member,
                            # since no context is taken over from one message to the next
    FRAMINGS = 3

cdef struct pass_out_t:
    shared_buf_t framed[FRAMINGS]
    size_t refs             # members pointing into it, + 1 while its pass is open
    size_t group


cdef struct group_t:
    uint64_t* members       # connection handles; stale ones are dropped lazily
    uint32_t length
    uint32_t capacity
    pass_out_t* pass_out    # this pass's broadcasts to the group, NULL when none


# The router <-> worker link: router -> worker commands (the link packet's action field;
# REPLY, PUSH_USER and BROADCAST are carried out in C), worker -> router events (action 0,
# the kind in the seq field), and the handle bits.
cpdef enum:
    CMD_REPLY = 1
    CMD_PUSH_USER = 2
    CMD_BROADCAST = 3
    CMD_BIND = 4
    CMD_FOLLOW = 5
    CMD_UNFOLLOW = 6
    CMD_CLOSE = 7
    CMD_BROADCAST_EXCEPT = 8
    CMD_CLOSE_USER = 9
    EVENT = 0
    EVENT_USER_GONE = 1
    EVENT_LISTENING = 2
    EVENT_USERS_CLOSED = 3
    HANDLE_BITS = 56

cdef uint64_t HANDLE_MASK = (<uint64_t>1 << HANDLE_BITS) - 1
LINK_HANDLE_MASK = HANDLE_MASK     # a handle's connection bits; the worker index sits above them
cdef uint64_t PEER_MARK_C = (<uint64_t>1) << 63

cdef enum:
    GEN_MASK = 0xFFFFFF     # handles fit in 56 bits, leaving 8 for a worker index
    LINK_PACKET_FLOOR = 64 * 1024 * 1024


def link_packet_limit(size_t max_packet):
    """The largest packet a link between zim processes carries (both ends use it):
    far above anything sent on one, so no client can make a link hit it. A link
    carries a client's request (at most ``max_packet``) with a 16-byte head, a
    store operation holding one message, an answer to a client or a push (one
    message, or a page kept under 1 MiB), a page of the store (bounded by bytes:
    about 1 MB and two messages at most). So max(64 MiB, 4 x max packet + 1 MiB),
    and a TCP length fits 32 bits."""
    return min(max(<size_t>LINK_PACKET_FLOOR, 4 * max_packet + (1 << 20)), <size_t>0xFFFFFFFF)


cdef inline uint32_t next_gen(uint32_t gen) noexcept nogil:
    gen = (gen + 1) & GEN_MASK
    return gen if gen else 1


cdef inline uint64_t make_handle(uint32_t gen, int fd) noexcept nogil:
    return (<uint64_t>gen << 32) | <uint32_t>fd


cdef inline int handle_fd(uint64_t handle) noexcept nogil:
    return <int><uint32_t>handle


cdef uint32_t NO_DEADLINE = <uint32_t>-1


cdef inline ssize_t member_index(const group_t* g, uint64_t conn) noexcept nogil:
    """Where ``conn`` is in a group's member array (a scan), -1 if not there."""
    cdef size_t i
    for i in range(g.length):
        if g.members[i] == conn:
            return <ssize_t>i
    return -1


cdef inline bint is_excluded(uint64_t handle, const uint64_t* excluded, size_t n,
                             uint8_t* found) noexcept nogil:
    """Binary search of a sorted handle array; marks found[k] when it is there."""
    cdef size_t low = 0, high = n, middle
    while low < high:
        middle = (low + high) // 2
        if excluded[middle] < handle:
            low = middle + 1
        elif excluded[middle] > handle:
            high = middle
        else:
            if found != NULL:
                found[middle] = 1
            return True
    return False


cdef bint grow(char** buf, uint32_t* capacity, size_t need, size_t first) noexcept nogil:
    """Double a buffer's capacity (from ``first``) until ``need`` fits; False: no memory."""
    cdef size_t cap = capacity[0] * 2 if capacity[0] else first
    cdef char* grown
    while cap < need:
        cap *= 2
    grown = <char*>realloc(buf[0], cap)
    if grown == NULL:
        return False
    buf[0] = grown
    capacity[0] = <uint32_t>cap
    return True


cdef int by_size_descending(const void* a, const void* b) noexcept nogil:
    """qsort order for (bytes << 32 | fd) keys: the largest first."""
    cdef uint64_t x = (<const uint64_t*>a)[0], y = (<const uint64_t*>b)[0]
    return -1 if x > y else (1 if x < y else 0)


cdef inline uint32_t now_seconds() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <uint32_t>ts.tv_sec


# ------------------------------------------------------------ addresses --
# A client's address key (conn_t.peer), set at accept from the address accept4 gives:
# - IPv4: the address itself, as a host-order int (127.0.0.5 is 0x7F000005);
# - an IPv4-mapped IPv6 address (a dual-stack listener): that IPv4 address, the same key;
# - any other IPv6 address: its /64 prefix (what one subscriber or host is given) through
#   SipHash-2-4 under a secret key into 32 bits, never 0: one client holding a whole /64
#   is one address. The key is random per server start and the same in every worker (the
#   router writes it into the address table's header), so an address has one key
#   everywhere in a server. A hashed key may equal an IPv4 key or another prefix's
#   (a chance of 2**-32 a pair): the two then count together, which can only overcount;
# - anything else: 0, not counted.
# Worker mode forwards a request of a connection not logged in with PEER_MARK | peer in
# its user field, so the router (App.serve) tells a user id (< 2**63) from an address.
PEER_MARK = 1 << 63

# The address table (--max-conns-per-address): connections per address over the whole
# server. A 4 KiB header (address_header_t: the keys) and one region per serving process
# (a worker, or the single process) of ADDRESS_SLOTS uint32 counters. A connection counts
# in slot SipHash(key, peer) mod ADDRESS_SLOTS of its own process's region: each process
# writes only its own region (one writer: no atomics); at accept it adds the slot up over
# every region (<= 64 reads) against the limit. The slot is keyed, so nobody can aim at
# another address's slot; addresses that share a slot count together (a collision only
# overcounts: a client may be refused a little early, never let past). Workers accepting
# the same address in the same instant may each see the count under the limit, so it can
# pass the limit by workers - 1 at most (each admits one at a time). With workers the router makes the table in
# shared memory (a memfd) and passes it on; a restarted worker clears its region (its
# connections are gone), as the router does when a worker dies. In one process it is one
# region of local memory. Memory: 256 KiB of address space a region, touched only where used.
cdef enum:
    ADDRESS_SLOTS = 65536
    ADDRESS_HEADER_BYTES = 4096

cdef uint64_t ADDRESS_MAGIC = 0x5a494d4144445231ULL     # "ZIMADDR1"
ADDRESS_REGION_BYTES = ADDRESS_SLOTS * 4

cdef struct address_header_t:
    uint64_t magic
    uint32_t slots
    uint32_t regions
    uint64_t key[4]         # [0], [1]: IPv6 /64 -> peer key; [2], [3]: peer key -> slot

cdef struct address_table_t:
    uint32_t* counts        # regions x ADDRESS_SLOTS; NULL: not counting
    uint32_t* own           # this process's region
    uint32_t regions
    uint64_t key[4]


cdef inline uint64_t rotl64(uint64_t x, int bits) noexcept nogil:
    return (x << bits) | (x >> (64 - bits))


cdef inline void sip_round(uint64_t* v) noexcept nogil:
    v[0] += v[1]; v[1] = rotl64(v[1], 13); v[1] ^= v[0]; v[0] = rotl64(v[0], 32)
    v[2] += v[3]; v[3] = rotl64(v[3], 16); v[3] ^= v[2]
    v[0] += v[3]; v[3] = rotl64(v[3], 21); v[3] ^= v[0]
    v[2] += v[1]; v[1] = rotl64(v[1], 17); v[1] ^= v[2]; v[2] = rotl64(v[2], 32)


cdef uint64_t siphash_u64(uint64_t k0, uint64_t k1, uint64_t m) noexcept nogil:
    """SipHash-2-4 of one 8-byte message (``m``'s bytes, little-endian)."""
    cdef uint64_t v[4]
    cdef uint64_t b = (<uint64_t>8) << 56
    v[0] = k0 ^ 0x736f6d6570736575ULL
    v[1] = k1 ^ 0x646f72616e646f6dULL
    v[2] = k0 ^ 0x6c7967656e657261ULL
    v[3] = k1 ^ 0x7465646279746573ULL
    v[3] ^= m
    sip_round(v)
    sip_round(v)
    v[0] ^= m
    v[3] ^= b
    sip_round(v)
    sip_round(v)
    v[0] ^= b
    v[2] ^= 0xff
    sip_round(v)
    sip_round(v)
    sip_round(v)
    sip_round(v)
    return v[0] ^ v[1] ^ v[2] ^ v[3]


cdef uint32_t ipv6_key(const unsigned char* a, const uint64_t* key) noexcept nogil:
    """The peer key of a 16-byte IPv6 address (see PEER_MARK above)."""
    cdef int i
    cdef uint32_t hashed
    for i in range(10):
        if a[i]:
            break
    else:
        if a[10] == 0xff and a[11] == 0xff:        # ::ffff:a.b.c.d
            return get32(<const char*>a + 12)
    hashed = <uint32_t>siphash_u64(key[0], key[1], get64(<const char*>a))
    return hashed if hashed else 1


cdef uint32_t peer_key(const sockaddr_storage* addr, socklen_t length, const uint64_t* key) noexcept nogil:
    """The address key of what accept4 gave (see PEER_MARK above); 0: none."""
    if addr.ss_family == AF_INET and length >= sizeof(sockaddr_in):
        return ntohl((<const sockaddr_in*>addr).sin_addr.s_addr)
    if addr.ss_family == AF_INET6 and length >= sizeof(sockaddr_in6):
        return ipv6_key((<const sockaddr_in6*>addr).sin6_addr.s6_addr, key)
    return 0


cdef inline size_t address_slot(const address_table_t* t, uint32_t peer) noexcept nogil:
    return <size_t>(siphash_u64(t.key[2], t.key[3], peer) & (ADDRESS_SLOTS - 1))


cdef uint64_t slot_total(const address_table_t* t, size_t slot) noexcept nogil:
    """Connections counted in a slot over every region (every worker)."""
    cdef uint64_t total = 0
    cdef uint32_t region
    for region in range(t.regions):
        total += t.counts[<size_t>region * ADDRESS_SLOTS + slot]
    return total


cdef uint64_t address_count(const address_table_t* t, uint32_t peer) noexcept nogil:
    """Connections counted in peer's slot over every region (every worker)."""
    return slot_total(t, address_slot(t, peer))


cdef bint address_admit(address_table_t* t, uint32_t peer, uint64_t limit) noexcept nogil:
    """Count one more connection of peer in this process's region, unless its slot
    holds ``limit`` already (then False: refuse it)."""
    cdef size_t slot = address_slot(t, peer)
    if slot_total(t, slot) >= limit:
        return False
    t.own[slot] += 1
    return True


cdef void address_release(address_table_t* t, uint32_t peer) noexcept nogil:
    cdef size_t slot = address_slot(t, peer)
    if t.own[slot]:
        t.own[slot] -= 1


cdef void random_keys(uint64_t* key) noexcept:
    """Four new secret 64-bit keys (address_header_t.key, address_table_t.key)."""
    cdef bytes raw = os.urandom(32)
    cdef int i
    for i in range(4):
        key[i] = get64(PyBytes_AS_STRING(raw) + 8 * i)


def address_table_bytes(uint32_t regions):
    """The size of an address table of ``regions`` regions (one per worker)."""
    return ADDRESS_HEADER_BYTES + <size_t>regions * ADDRESS_REGION_BYTES


def init_address_table(buffer, uint32_t regions):
    """Write the header of a new address table (zeroed memory of address_table_bytes
    (regions)): new random keys, for every process of one server start."""
    cdef unsigned char[::1] view = memoryview(buffer).cast("B")
    cdef address_header_t* header
    if regions < 1 or <size_t>view.shape[0] < address_table_bytes(regions):
        raise ValueError("address table too small")
    header = <address_header_t*>&view[0]
    header.slots = ADDRESS_SLOTS
    header.regions = regions
    random_keys(header.key)
    header.magic = ADDRESS_MAGIC


cdef void clear_region(uint32_t* region) noexcept nogil:
    """Zero one region, giving its pages back when it is shared memory."""
    if madvise(<void*>region, ADDRESS_SLOTS * sizeof(uint32_t), MADV_REMOVE) < 0:
        memset(region, 0, ADDRESS_SLOTS * sizeof(uint32_t))


cdef int open_address_table(object buffer, uint32_t index, address_table_t* t) except -1:
    """Point ``t`` at a shared table's counters (index: this process's region)."""
    cdef unsigned char[::1] view = memoryview(buffer).cast("B")
    cdef address_header_t* header
    if <size_t>view.shape[0] < ADDRESS_HEADER_BYTES:
        raise ValueError("not an address table")
    header = <address_header_t*>&view[0]
    if header.magic != ADDRESS_MAGIC or header.slots != ADDRESS_SLOTS:
        raise ValueError("not an address table")
    if index >= header.regions or <size_t>view.shape[0] < address_table_bytes(header.regions):
        raise ValueError(f"no region {index} in this address table")
    t.counts = <uint32_t*>(&view[0] + ADDRESS_HEADER_BYTES)
    t.own = t.counts + <size_t>index * ADDRESS_SLOTS
    t.regions = header.regions
    memcpy(t.key, header.key, sizeof(t.key))
    return 0


def clear_address_region(buffer, uint32_t index):
    """Zero region ``index`` of a shared address table (its worker died: the
    connections it counted are gone)."""
    cdef address_table_t t
    open_address_table(buffer, index, &t)
    clear_region(t.own)


def _debug_siphash(uint64_t k0, uint64_t k1, uint64_t m):
    """Tests: the SipHash-2-4 the address keys and slots use."""
    return siphash_u64(k0, k1, m)


def _debug_ipv6_key(bytes address, uint64_t k0, uint64_t k1):
    """Tests: the peer key of a packed 16-byte IPv6 address under key (k0, k1)."""
    cdef uint64_t key[2]
    if len(address) != 16:
        raise ValueError("an IPv6 address is 16 bytes")
    key[0] = k0
    key[1] = k1
    return ipv6_key(<const unsigned char*>PyBytes_AS_STRING(address), key)


cdef class _DebugAddressTable:
    """Tests: one process's view of a shared address table (the functions accept and
    close use), to check the accounting without sockets."""
    cdef address_table_t t
    cdef object view

    def __init__(self, buffer, uint32_t index):
        open_address_table(buffer, index, &self.t)
        self.view = memoryview(buffer)

    def admit(self, uint32_t peer, uint64_t limit):
        return address_admit(&self.t, peer, limit)

    def release(self, uint32_t peer):
        address_release(&self.t, peer)

    def count(self, uint32_t peer):
        return address_count(&self.t, peer)

    def slot(self, uint32_t peer):
        return address_slot(&self.t, peer)

    def clear(self):
        clear_region(self.t.own)


cdef class Reactor:
    """An edge-triggered epoll loop serving TCP and WebSocket connections.

    ``on_packet(conn, action, seq, body)`` is called once per complete request;
    ``conn`` is an int handle, valid until the connection closes.
    """
    cdef int epfd
    cdef int reserve_fd
    cdef int max_fds
    cdef int high_fd                # the highest descriptor claimed so far: table scans stop there
    cdef conn_t* conns
    cdef size_t max_packet
    cdef readonly size_t link_max_packet    # link_packet_limit(max_packet): links' packets, either way
    cdef char* scratch
    cdef size_t scratch_cap
    cdef object on_packet
    cdef public object on_user_gone    # callable(user_id): its last connection here closed
    cdef public object on_link_closed  # callable(conn): a link to another process closed
    cdef public object on_tick         # callable(): once a second, from the loop
    cdef uint64_t link                 # worker mode: the router link (see forward_to)
    cdef public object on_request      # router mode: callable(conn, user, action, seq, body)
    cdef uint8_t* route_table
    cdef handle_list_t gone_users      # reported after the pass, never from inside a C loop
    cdef public object on_users_closed  # callable(bytes): 8-byte user ids, one per logged-in close
    cdef handle_list_t closed_users    # ... gathered over the pass (see _report_closed_users)
    # connections per address (--max-conns-per-address): see "The address table" above
    cdef uint32_t max_conns_per_address     # 0: no limit
    cdef address_table_t addresses
    cdef bint addresses_local               # addresses.counts is ours (calloc), not shared
    cdef object shared_addresses            # keeps a shared table's buffer exported
    cdef bytes refuse_tcp, refuse_ws        # the refusal over the limit, one write each
    cdef bint running
    cdef uint32_t now
    cdef size_t outbuf_limit
    cdef bint ws_deflate               # negotiate permessage-deflate with clients that offer it
    cdef object ws_origins             # None: any Origin; else a zim.origins.OriginPolicy
    cdef zcodec_t z                    # the deflater and inflater every deflate connection shares
    cdef handle_list_t pending      # connections with queued output: flushed once per pass
    cdef handle_list_t again        # read budget ran out before EAGAIN: resume next pass
    cdef handle_list_t draining     # half-closed, draining input until EOF or a deadline
    cdef handle_list_t backlog      # client connections the kernel did not take all from (EPOLLOUT)
    cdef size_t memory_budget       # bytes of output the backlog may hold in all (0: no budget)
    cdef uint32_t max_inflight      # requests of one connection in flight before it is not read
    cdef idmap_t presence           # user id -> first connection fd (next: conn.next_dev)
    # channel groups, indexed by group id
    cdef group_t* groups
    cdef size_t groups_cap
    cdef handle_list_t pass_outs    # pass_out_t pointers of the groups broadcast to this pass
    cdef list listeners
    cdef dict watches                  # fd -> callback, for S_WATCH slots
    # liveness: a hashed timing wheel of connections, one slot per second
    cdef int32_t wheel[WHEEL_SLOTS]
    cdef uint32_t wheel_now
    cdef uint32_t login_timeout, idle_timeout
    # metric counters (C_*): own_counters, or memory another process reads (share_counters)
    cdef uint64_t* counters
    cdef uint64_t own_counters[N_COUNTERS]
    cdef object shared_counters         # keeps that memory's buffer exported while in use

    def __cinit__(self, size_t max_packet, object on_packet, size_t outbuf_limit=DEF_OUTBUF_LIMIT,
                  uint32_t login_timeout=10, uint32_t idle_timeout=300, bint ws_deflate=True,
                  uint32_t max_inflight=DEF_MAX_INFLIGHT, size_t memory_budget=0, object ws_origins=None,
                  uint32_t max_conns_per_address=0):
        cdef rlimit lim
        cdef int i
        cdef bytes body
        random_keys(self.addresses.key)     # a server of workers shares one: share_address_table
        self.max_conns_per_address = max_conns_per_address
        if max_conns_per_address:
            # one region of local memory (calloc: pages never used cost nothing)
            self.addresses.counts = <uint32_t*>calloc(ADDRESS_SLOTS, sizeof(uint32_t))
            if self.addresses.counts == NULL:
                raise MemoryError("reactor setup failed")
            self.addresses.own = self.addresses.counts
            self.addresses.regions = 1
            self.addresses_local = True
        body = (b'{"error":{"code":"too_many_connections","message":"at most %d connections per address"}}'
                % max_conns_per_address)
        self.refuse_tcp = PyBytes_FromStringAndSize(NULL, TCP_HEADER + len(body))
        tcp_header(PyBytes_AS_STRING(self.refuse_tcp), len(body), 0, 0)
        memcpy(PyBytes_AS_STRING(self.refuse_tcp) + TCP_HEADER, PyBytes_AS_STRING(body), len(body))
        body = b"at most %d connections per address\n" % max_conns_per_address
        self.refuse_ws = (b"HTTP/1.1 429 Too Many Requests\r\nConnection: close\r\n"
                          b"Content-Type: text/plain; charset=utf-8\r\nContent-Length: %d\r\n\r\n%s"
                          % (len(body), body))
        for i in range(WHEEL_SLOTS):
            self.wheel[i] = NO_CONN
        memset(self.own_counters, 0, sizeof(self.own_counters))
        self.counters = self.own_counters
        self.login_timeout = login_timeout
        self.idle_timeout = idle_timeout
        self.ws_deflate = ws_deflate
        self.ws_origins = ws_origins
        getrlimit(RLIMIT_NOFILE, &lim)
        # Output buffers are freed as soon as the kernel takes their bytes; keep
        # up to 32 MiB of freed heap so each burst does not fault pages back in.
        mallopt(M_TRIM_THRESHOLD, 32 * 1024 * 1024)
        self.max_fds = <int>min(lim.rlim_cur, 1 << 24)
        # calloc of a large table maps zero pages lazily: slots never used cost no RSS
        self.conns = <conn_t*>calloc(self.max_fds, sizeof(conn_t))
        self.max_packet = max_packet
        # room for a whole maximal WebSocket frame plus a read's worth more
        self.link_max_packet = link_packet_limit(max_packet)
        # (address space: pages are touched only as far as reads reach)
        self.scratch_cap = max(max_packet, self.link_max_packet) + WS_MAX_FRAME_HEADER + 256 * 1024
        self.scratch = <char*>malloc(self.scratch_cap)
        self.epfd = epoll_create1(EPOLL_CLOEXEC)
        self.reserve_fd = c_open(b"/dev/null", O_RDONLY | O_CLOEXEC)
        if self.conns == NULL or self.scratch == NULL or self.epfd < 0:
            raise MemoryError("reactor setup failed")
        self.on_packet = on_packet
        self.outbuf_limit = outbuf_limit
        self.max_inflight = max(1, min(max_inflight, 0xFFFF))
        self.memory_budget = memory_budget
        if idmap_init(&self.presence) < 0:
            raise MemoryError("reactor setup failed")
        self.listeners = []
        self.watches = {}
        self.now = now_seconds()
        self.wheel_now = self.now
        self.running = True             # until stop(), which may come before run()

    def __dealloc__(self):
        cdef size_t i
        self._end_pass()
        if self.conns != NULL:
            for i in range(<size_t>self.max_fds):
                if self.conns[i].state != S_FREE:
                    self._release(<int>i)
            free(self.conns)
        if self.groups != NULL:
            for i in range(self.groups_cap):
                free(self.groups[i].members)
            free(self.groups)
        free(self.scratch)
        free(self.pending.items)
        free(self.again.items)
        free(self.draining.items)
        free(self.backlog.items)
        free(self.gone_users.items)
        free(self.closed_users.items)
        free(self.pass_outs.items)
        if self.addresses_local:
            free(self.addresses.counts)
        free(self.route_table)
        zcodec_free(&self.z)
        idmap_free(&self.presence)
        if self.epfd >= 0:
            close(self.epfd)
        if self.reserve_fd >= 0:
            close(self.reserve_fd)

    # ------------------------------------------------------------ listen --
    def listen(self, str host, int port, bint websocket=False, int backlog=4096):
        """Bind a listener (SO_REUSEPORT, so several workers may share the port)."""
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.listen(backlog)
        sock.setblocking(False)
        fd = sock.detach()
        self._claim_or_raise(fd, S_LISTEN_WS if websocket else S_LISTEN_TCP, 0, EPOLLIN | EPOLLET)
        self.listeners.append(fd)

    def watch(self, int fd, object callback):
        """Call ``callback()`` from the loop whenever ``fd`` becomes readable.

        For wake-ups from other threads or processes (an eventfd, a pipe): the
        callback must drain the descriptor (edge-triggered). The fd stays the
        caller's to close, after unwatch().
        """
        if fd < 0 or fd >= self.max_fds or self.conns[fd].state != S_FREE:
            raise ValueError("bad descriptor to watch")
        self._claim_or_raise(fd, S_WATCH, 0, EPOLLIN | EPOLLET)
        self.watches[fd] = callback

    def unwatch(self, int fd):
        """Stop watching fd (it is not closed)."""
        cdef epoll_event ev
        if 0 <= fd < self.max_fds and self.conns[fd].state == S_WATCH:
            epoll_ctl(self.epfd, EPOLL_CTL_DEL, fd, &ev)
            self.conns[fd].state = S_FREE
            del self.watches[fd]

    cdef void _on_watch(self, int fd) noexcept:
        try:
            self.watches[fd]()
        except BaseException as exc:
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                self.running = False
            log.exception("watch callback failed")

    cdef int _claim(self, int fd, uint8_t state, uint16_t flags, uint32_t events) noexcept:
        """Take a free slot for fd under a new generation and add fd to the epoll set
        (events carry the handle); -1 (slot left free) if epoll refuses it."""
        cdef conn_t* c = &self.conns[fd]
        cdef epoll_event ev
        if fd > self.high_fd:
            self.high_fd = fd
        c.gen = next_gen(c.gen)
        c.state = state
        c.flags = flags
        c.user = 0
        c.peer = 0
        c.next_dev = NO_CONN
        c.wheel_prev = c.wheel_next = NO_CONN - 1     # not in the timing wheel
        ev.events = events
        ev.data.u64 = make_handle(c.gen, fd)
        if epoll_ctl(self.epfd, EPOLL_CTL_ADD, fd, &ev) < 0:
            c.state = S_FREE
            return -1
        return 0

    cdef int _claim_or_raise(self, int fd, uint8_t state, uint16_t flags, uint32_t events) except -1:
        if self._claim(fd, state, flags, events) < 0:
            raise OSError(errno, "epoll_ctl ADD failed")
        return 0

    cdef void _epoll_mod(self, int fd, uint32_t events) noexcept:
        cdef epoll_event ev
        ev.events = events
        ev.data.u64 = make_handle(self.conns[fd].gen, fd)
        epoll_ctl(self.epfd, EPOLL_CTL_MOD, fd, &ev)

    # ------------------------------------------------------------- loop --
    def run(self):
        """Run until stop(). Signals interrupt epoll_wait and run Python handlers."""
        cdef epoll_event events[MAX_EVENTS]
        cdef int n, i, fd, timeout
        cdef uint64_t handle
        cdef uint32_t ev, last_sweep
        last_sweep = self.now
        while self.running:
            timeout = 0 if self.again.length else 1000
            # Other threads (a store writer, a Redis client) run while we wait.
            with nogil:
                n = epoll_wait(self.epfd, events, MAX_EVENTS, timeout)
            if n < 0:
                if errno != EINTR:
                    raise OSError(errno, "epoll_wait failed")
                n = 0
            # A signal may land while the loop is busy, not only inside
            # epoll_wait: run Python's handlers (a flag check) every pass.
            PyErr_CheckSignals()
            self.now = now_seconds()
            self._resume_reads()
            for i in range(n):
                handle = events[i].data.u64
                fd = handle_fd(handle)
                if self.conns[fd].gen != <uint32_t>(handle >> 32) or self.conns[fd].state == S_FREE:
                    continue            # closed (and maybe reused) earlier in this iteration
                ev = events[i].events
                if self.conns[fd].state == S_LISTEN_TCP or self.conns[fd].state == S_LISTEN_WS:
                    self._accept(fd)
                    continue
                if self.conns[fd].state == S_WATCH:
                    self._on_watch(fd)
                    continue
                if ev & EPOLLERR:
                    self._close(fd)
                    continue
                if ev & (EPOLLIN | EPOLLRDHUP | EPOLLHUP):
                    self._on_readable(fd)
                    if self.conns[fd].gen != <uint32_t>(handle >> 32) or self.conns[fd].state == S_FREE:
                        continue
                if ev & EPOLLOUT:
                    self._mark_pending(fd)
            self._flush_all()
            self._end_pass()
            if self.backlog.length and self.memory_budget:
                self._keep_to_budget()
            if self.now != last_sweep:
                last_sweep = self.now
                self._every_second()
            if self.closed_users.length:
                self._report_closed_users()     # before the gone users: a count drops, then goes
            if self.gone_users.length:
                self._report_gone_users()

    cdef void _every_second(self) noexcept:
        self._sweep_draining()
        self._expire_idle()
        self._refresh_gauges()
        if self.on_tick is not None:
            try:
                self.on_tick()
            except BaseException:
                log.exception("tick handler failed")

    cdef void _report_gone_users(self) noexcept:
        cdef handle_list_t batch = handles_take(&self.gone_users)
        cdef size_t i
        try:
            for i in range(batch.length):
                if not self._has_user(batch.items[i]):      # not back meanwhile
                    self.on_user_gone(batch.items[i])
        except BaseException:
            log.exception("user-gone handler failed")
        free(batch.items)

    cdef void _report_closed_users(self) noexcept:
        """Hand ``on_users_closed`` the user ids of the logged-in connections closed (or
        bound to another user) this pass, 8 bytes big-endian each, one per connection
        (a user closing three here is there three times); a long list in parts."""
        cdef handle_list_t batch = handles_take(&self.closed_users)
        cdef size_t i, start, n
        cdef bytes part
        try:
            for start in range(0, batch.length, CLOSED_USERS_PART):
                n = min(batch.length - start, <size_t>CLOSED_USERS_PART)
                part = PyBytes_FromStringAndSize(NULL, n * 8)
                for i in range(n):
                    put64(PyBytes_AS_STRING(part) + 8 * i, batch.items[start + i])
                self.on_users_closed(part)
        except BaseException:
            log.exception("users-closed handler failed")
        free(batch.items)

    def stop(self):
        """Leave run() after the current iteration (safe from a signal handler,
        also before run() has started)."""
        self.running = False

    def close_all(self):
        """Stop listening, flush what is queued (one try), close every connection."""
        cdef int fd
        for fd in self.listeners:
            if self.conns[fd].state != S_FREE:
                close(fd)
                self.conns[fd].state = S_FREE
        self.listeners = []
        self._flush_all()
        self._end_pass()
        for fd in range(self.max_fds):
            if self.conns[fd].state >= S_TCP:
                self._close_for(fd, R_SHUTDOWN)

    # ----------------------------------------------------------- accept --
    cdef void _accept(self, int lfd) noexcept:
        cdef int fd, one = 1
        cdef uint8_t kind = S_WS_HANDSHAKE if self.conns[lfd].state == S_LISTEN_WS else S_TCP
        cdef conn_t* c
        cdef sockaddr_storage addr
        cdef socklen_t addr_len
        cdef uint32_t peer
        cdef bint counted
        while True:
            addr_len = sizeof(addr)
            addr.ss_family = 0
            fd = accept4(lfd, <sockaddr*>&addr, &addr_len, SOCK_NONBLOCK | SOCK_CLOEXEC)
            if fd < 0:
                if errno == EINTR:
                    continue
                if errno == EMFILE or errno == ENFILE:
                    # Out of descriptors: free the reserve, take the waiting
                    # connection and close it, so the edge is not left pending.
                    if self.reserve_fd >= 0:
                        close(self.reserve_fd)
                        fd = accept4(lfd, NULL, NULL, SOCK_CLOEXEC)
                        if fd >= 0:
                            close(fd)
                            self.counters[C_CLOSED + R_FD_LIMIT] += 1
                        self.reserve_fd = c_open(b"/dev/null", O_RDONLY | O_CLOEXEC)
                        if fd >= 0:
                            continue
                    return
                if errno == ENOBUFS or errno == ENOMEM:
                    return
                return                  # EAGAIN or a transient error from the peer
            if fd >= self.max_fds:      # cannot happen under RLIMIT_NOFILE; be safe
                close(fd)
                self.counters[C_CLOSED + R_FD_LIMIT] += 1
                continue
            peer = peer_key(&addr, addr_len, self.addresses.key)
            counted = self.max_conns_per_address and peer and self.addresses.counts != NULL
            if counted and not address_admit(&self.addresses, peer, self.max_conns_per_address):
                self._refuse(fd, kind)
                continue
            setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one))
            if self._claim(fd, kind, F_COUNTED if counted else 0, EPOLLIN | EPOLLRDHUP | EPOLLET) < 0:
                if counted:
                    address_release(&self.addresses, peer)
                close(fd)
                continue
            c = &self.conns[fd]
            c.peer = peer
            c.last_active = self.now
            c.born = self.now
            self._wheel_insert(fd)
            self.counters[C_ACCEPTED] += 1
            self.counters[C_CONNECTIONS_TCP if kind == S_TCP else C_CONNECTIONS_WS] += 1

    cdef void _refuse(self, int fd, uint8_t kind) noexcept:
        """Over --max-conns-per-address: say so, best effort, and close, without taking a
        slot. What the client sent already is read first, so the close is a FIN after
        the answer rather than a reset that could overtake it."""
        cdef bytes answer = self.refuse_ws if kind == S_WS_HANDSHAKE else self.refuse_tcp
        cdef ssize_t n
        n = read(fd, self.scratch, min(self.scratch_cap, <size_t>MAX_HANDSHAKE))
        n = write(fd, PyBytes_AS_STRING(answer), PyBytes_GET_SIZE(answer))
        close(fd)
        self.counters[C_CLOSED + R_ADDRESS_LIMIT] += 1

    # ------------------------------------------------------------- read --
    cdef void _on_readable(self, int fd) noexcept:
        cdef conn_t* c = &self.conns[fd]
        cdef uint32_t gen = c.gen
        cdef size_t have = 0, used
        cdef ssize_t n
        cdef int reads = 0
        if c.flags & F_PAUSED:
            return                      # resume() brings it back
        if not (c.flags & F_SHUT):      # a draining peer keeps its deadline
            c.last_active = self.now
        if c.inlen:
            memcpy(self.scratch, c.inbuf, c.inlen)
            have = c.inlen
            free(c.inbuf)
            c.inbuf = NULL
            c.inlen = 0
            if not (c.flags & (F_CLOSING | F_SHUT)):
                # a resumed connection may hold whole requests already
                used = self._process(fd, gen, have)
                if c.gen != gen or c.state == S_FREE:
                    return
                memmove(self.scratch, self.scratch + used, have - used)
                have -= used
        while not (c.flags & F_PAUSED):
            if reads == READS_PER_EVENT:
                c.flags |= F_READ_AGAIN
                handles_push(&self.again, make_handle(gen, fd))
                break
            n = read(fd, self.scratch + have, self.scratch_cap - have)
            if n > 0:
                reads += 1
                self.counters[C_LINK_BYTES_IN if c.flags & F_LINK else C_BYTES_IN] += <uint64_t>n
                have += <size_t>n
                if c.flags & (F_CLOSING | F_SHUT):
                    have = 0            # draining: discard
                    continue
                used = self._process(fd, gen, have)
                if c.gen != gen or c.state == S_FREE:
                    return
                if used:
                    memmove(self.scratch, self.scratch + used, have - used)
                    have -= used
                continue                # (a pause set by a handler ends the loop)
            if n == 0:
                if c.flags & F_SHUT:
                    self._close(fd)
                    return
                c.flags |= F_PEER_EOF | F_CLOSING
                self._mark_pending(fd)  # flush answers, then close
                have = 0
                break
            if errno == EINTR:
                continue
            if errno == EAGAIN:
                break
            self._close(fd)             # ECONNRESET and friends
            return
        if have and not (c.flags & (F_CLOSING | F_SHUT)):
            c.inbuf = <char*>malloc(have)
            if c.inbuf == NULL:
                self._close_for(fd, R_NO_MEMORY)
                return
            memcpy(c.inbuf, self.scratch, have)
            c.inlen = <uint32_t>have

    cdef void _resume_reads(self) noexcept:
        cdef handle_list_t batch = handles_take(&self.again)
        cdef size_t i
        cdef int fd
        for i in range(batch.length):
            fd = self._conn_fd(batch.items[i])
            if fd >= 0 and self.conns[fd].flags & F_READ_AGAIN:
                self.conns[fd].flags &= ~F_READ_AGAIN
                self._on_readable(fd)
        free(batch.items)

    cdef size_t _process(self, int fd, uint32_t gen, size_t have) noexcept:
        """Handle every complete unit in scratch[0:have]; return bytes consumed."""
        cdef conn_t* c = &self.conns[fd]
        cdef size_t offset = 0, consumed
        cdef packet_t pkt
        cdef int ev
        cdef Py_ssize_t head_end
        while offset < have:
            if c.flags & F_PAUSED:
                return offset           # held: the bytes stay buffered until resume()
            if c.state == S_TCP:
                ev = tcp_next(self.scratch + offset, have - offset,
                              self.link_max_packet if c.flags & F_LINK else self.max_packet, &pkt, &consumed)
            elif c.state == S_WS:
                ev = ws_next(self.scratch + offset, have - offset, self.max_packet, &c.ws,
                             &self.z if c.deflate_bits else NULL, &pkt, &consumed)
            elif c.state == S_WS_HANDSHAKE:
                head_end = find_header_end(self.scratch + offset, have - offset)
                if head_end < 0:
                    if have - offset > MAX_HANDSHAKE:
                        self._queue_raw(fd, _HTTP_400)
                        self._begin_close_for(fd, R_PROTOCOL_ERROR)
                        return have
                    return offset
                if not self._handshake(fd, offset, <size_t>head_end):
                    return have
                offset += <size_t>head_end
                continue
            else:
                return have
            offset += consumed
            if ev == EV_NEED_MORE:
                return offset
            if ev == EV_PACKET:
                if not (c.flags & F_LINK):
                    self.counters[C_PACKETS_IN] += 1
                    self.counters[C_REQUESTS + (pkt.action if 0 <= pkt.action < REQUEST_ACTIONS
                                                else REQUEST_ACTIONS)] += 1
                    if c.deflate_bits and pkt.body == self.z.inflated + WS_PACKET_HEADER:
                        self.counters[C_INFLATED_IN] += 1
                    if pkt.action == ACTION_LOGIN and c.user == 0:
                        c.flags |= F_LOGGING_IN
                self._dispatch(fd, &pkt)
                if c.gen == gen and c.inflight == 0:
                    c.flags &= ~F_LOGGING_IN        # answered at once (or nothing to wait for)
                if c.state == S_WS:
                    ws_release(&c.ws)
                if c.gen != gen or c.state == S_FREE:
                    return have
                if c.flags & (F_CLOSING | F_SHUT):
                    return have
            elif ev == EV_SKIP or ev == EV_PONG:
                pass
            elif ev == EV_PING:
                self._queue_control(fd, 10, pkt.body, pkt.body_len)
            elif ev == EV_CLOSE:
                self._ws_close(fd, pkt.close_code if pkt.close_code else 1000)
                return have
            elif ev == EV_TEXT:
                self._set_reason(fd, R_PROTOCOL_ERROR)
                self._ws_close(fd, 1003)
                return have
            elif ev == EV_BAD_UTF8 or ev == EV_BAD_DEFLATE:
                self._set_reason(fd, R_PROTOCOL_ERROR)
                self._ws_close(fd, 1007)
                return have
            elif c.flags & F_LINK:      # EV_TOO_LARGE or EV_BROKEN from another zim process
                self._link_broken(fd, offset, have, ev)
                return have
            elif ev == EV_TOO_LARGE:
                self._set_reason(fd, R_TOO_LARGE)
                c.flags |= F_FINAL_TOO_LARGE
                c.final_action = <uint16_t>pkt.action
                c.final_seq = <uint16_t>pkt.seq
                if c.state == S_WS:
                    self._ws_close(fd, 1009)
                else:
                    self._begin_close(fd)
                return have
            else:                       # EV_BROKEN
                self._set_reason(fd, R_PROTOCOL_ERROR)
                if c.state == S_WS:
                    self._ws_close(fd, 1002)
                else:
                    self._begin_close(fd)
                return have
        return offset

    cdef void _link_broken(self, int fd, size_t offset, size_t have, int ev) noexcept:
        """A link sent a frame no zim process sends (over the links' limit, or
        unframeable): close it at once. Nothing is written into it: a client's
        ``too_large`` answer would be one more bad frame to the other end. Its
        owner learns of it through ``on_link_closed``, as for any link that ends."""
        cdef uint32_t length = get32(self.scratch + offset) if have - offset >= 4 else 0
        try:
            log.error("closing a link: %s frame of %d bytes (links carry up to %d)",
                      "an oversized" if ev == EV_TOO_LARGE else "a broken", length, self.link_max_packet)
        except BaseException:
            pass
        self._close(fd)

    cdef bint _handshake(self, int fd, size_t offset, size_t head_len) noexcept:
        cdef conn_t* c = &self.conns[fd]
        cdef object answer
        try:
            answer = ws_handshake(PyBytes_FromStringAndSize(self.scratch + offset, head_len), self.ws_deflate,
                                  self.ws_origins)
        except BaseException:
            answer = None
        if answer is None:
            self._queue_raw(fd, _HTTP_400)
            self._begin_close_for(fd, R_PROTOCOL_ERROR)
            return False
        if answer[1] < 0:               # a valid upgrade from an Origin not in --ws-origins: 403
            self._queue_raw(fd, answer[0])
            self._begin_close_for(fd, R_ORIGIN)
            return False
        self._queue_raw(fd, answer[0])
        c.deflate_bits = <uint8_t>answer[1]
        c.state = S_WS
        return True

    cdef void _dispatch(self, int fd, packet_t* pkt) noexcept:
        cdef object body
        if self.link:
            if not (self.conns[fd].flags & F_LINK):
                self._forward(fd, pkt)
                return
            if self._run_command(pkt):
                return
        elif self.on_request is not None and self.conns[fd].flags & F_LINK and self.conns[fd].user \
                and pkt.action and pkt.body_len >= 16:     # from a worker link (set_link_index)
            self._route_request(fd, pkt)
            return
        body = PyBytes_FromStringAndSize(pkt.body, pkt.body_len)
        try:
            self.on_packet(make_handle(self.conns[fd].gen, fd), pkt.action, pkt.seq, body)
        except BaseException as exc:
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                self.running = False
            log.exception("packet handler failed")

    # ------------------------------------------------------------ write --
    cdef char* _reserve(self, int fd, size_t extra) noexcept:
        """Room for extra more output bytes; NULL if the connection was dropped."""
        cdef conn_t* c = &self.conns[fd]
        cdef size_t need
        if c.flags & F_SHARED and not self._unshare(fd, 0):
            return NULL
        need = c.outlen + extra
        if need > c.outcap:
            if need > self.outbuf_limit and not (c.flags & F_LINK):
                self._close_for(fd, R_OUTPUT_CAP)   # a consumer that stopped reading
                return NULL
            if not grow(&c.outbuf, &c.outcap, need, 512):
                self._close_for(fd, R_NO_MEMORY)
                return NULL
        if not (c.flags & F_PENDING):
            self._mark_pending(fd)
        return c.outbuf + c.outlen

    cdef void _mark_pending(self, int fd) noexcept:
        cdef conn_t* c = &self.conns[fd]
        if c.flags & F_PENDING:
            return
        c.flags |= F_PENDING
        handles_push(&self.pending, make_handle(c.gen, fd))

    cdef bint _queue_packet(self, int fd, int action, int seq, const char* body, size_t body_len) noexcept:
        cdef conn_t* c = &self.conns[fd]
        cdef char* out
        cdef size_t head, deflated
        if c.flags & F_SHUT:
            return False
        if c.flags & F_LINK and body_len + TCP_HEADER > self.link_max_packet:
            self._refuse_link_packet(action, body_len + TCP_HEADER)
            return False
        if c.state == S_WS and ws_deflate_fits(c.deflate_bits, body_len + WS_PACKET_HEADER):
            deflated = ws_deflate(&self.z, action, seq, body, body_len)
            if deflated:
                out = self._reserve(fd, WS_MAX_FRAME_HEADER + deflated)
                if out == NULL:
                    return False
                head = ws_deflated_header(out, deflated)
                memcpy(out + head, self.z.deflated, deflated)
                c.outlen += <uint32_t>(head + deflated)
                self.counters[C_DEFLATED_OUT] += 1
                return True
        out = self._reserve(fd, WS_MAX_FRAME_HEADER + WS_PACKET_HEADER + body_len)
        if out == NULL:
            return False
        if c.state == S_WS:
            head = ws_packet_header(out, body_len, action, seq)
        else:
            head = tcp_header(out, body_len, action, seq)
        memcpy(out + head, body, body_len)
        c.outlen += <uint32_t>(head + body_len)
        return True

    cdef void _refuse_link_packet(self, int action, size_t length) noexcept:
        """A packet too big for a link is not queued (the other end would close
        the link): the caller fails that one call. Nothing zim sends comes near."""
        try:
            log.error("a packet of %d bytes (action %d) is over the links' limit of %d: not sent",
                      length, action, self.link_max_packet)
        except BaseException:
            pass

    cdef void _queue_raw(self, int fd, bytes data) noexcept:
        cdef char* out = self._reserve(fd, len(data))
        if out != NULL:
            memcpy(out, PyBytes_AS_STRING(data), len(data))
            self.conns[fd].outlen += <uint32_t>len(data)

    cdef void _queue_control(self, int fd, int opcode, const char* payload, size_t length) noexcept:
        cdef char* out = self._reserve(fd, WS_MAX_FRAME_HEADER + length)
        cdef size_t head
        if out != NULL:
            head = ws_frame_header(out, length, opcode)
            memcpy(out + head, payload, length)
            self.conns[fd].outlen += <uint32_t>(head + length)

    cdef void _ws_close(self, int fd, int code) noexcept:
        """Close with a WebSocket close frame, sent after every pending answer."""
        self.conns[fd].close_code = <uint16_t>code
        self._begin_close(fd)

    cdef void _queue_final(self, int fd) noexcept:
        """The last words of a closing connection, once all its answers are out."""
        cdef conn_t* c = &self.conns[fd]
        cdef char payload[2]
        if c.flags & F_FINAL_TOO_LARGE:
            c.flags &= ~F_FINAL_TOO_LARGE
            self._queue_packet(fd, c.final_action, c.final_seq, _TOO_LARGE_BODY, len(_TOO_LARGE_BODY))
        if c.close_code and c.state == S_WS:
            put16(payload, c.close_code)
            c.close_code = 0
            self._queue_control(fd, 8, payload, 2)

    cdef void _begin_close(self, int fd) noexcept:
        """No more requests from fd: flush what is queued, half-close, drain, close."""
        if self.conns[fd].state == S_FREE:
            return
        self.conns[fd].flags |= F_CLOSING
        self._mark_pending(fd)

    cdef inline void _set_reason(self, int fd, uint8_t reason) noexcept:
        """Why the server closes fd; the first reason given stands."""
        if self.conns[fd].close_reason == R_PEER:
            self.conns[fd].close_reason = reason

    cdef void _begin_close_for(self, int fd, uint8_t reason) noexcept:
        self._set_reason(fd, reason)
        self._begin_close(fd)

    cdef void _close_for(self, int fd, uint8_t reason) noexcept:
        self._set_reason(fd, reason)
        self._close(fd)

    cdef void _flush_all(self) noexcept:
        cdef handle_list_t batch = handles_take(&self.pending)
        cdef size_t i
        cdef int fd
        for i in range(batch.length):
            fd = self._conn_fd(batch.items[i])
            if fd >= 0:
                self.conns[fd].flags &= ~F_PENDING
                self._flush(fd)
        free(batch.items)

    cdef int _write_out(self, int fd) noexcept:
        """One write of everything queued: 1 all out, 0 some left (EPOLLOUT armed), -1 closed."""
        cdef conn_t* c = &self.conns[fd]
        cdef ssize_t n
        if c.flags & F_SHARED and self._write_shared(fd) < 0:
            return -1
        while c.outlen:
            n = write(fd, c.outbuf, c.outlen)
            if n < 0:
                if errno == EINTR:
                    continue
                if errno == EAGAIN:
                    break
                self._close(fd)         # EPIPE, ECONNRESET: the peer is gone
                return -1
            self.counters[C_LINK_BYTES_OUT if c.flags & F_LINK else C_BYTES_OUT] += <uint64_t>n
            if <size_t>n < c.outlen:
                memmove(c.outbuf, c.outbuf + n, c.outlen - n)
            c.outlen -= <uint32_t>n
        if c.outlen:
            if not (c.flags & F_EPOLLOUT):
                c.flags |= F_EPOLLOUT
                self._epoll_mod(fd, EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET)
                if not (c.flags & F_LINK):
                    handles_push(&self.backlog, make_handle(c.gen, fd))
            return 0
        return 1

    cdef inline size_t _held(self, int fd) noexcept:
        """Bytes of memory a connection's output holds (a shared slice: its length)."""
        return self.conns[fd].outlen if self.conns[fd].flags & F_SHARED else self.conns[fd].outcap

    cdef void _keep_to_budget(self) noexcept:
        """The output the kernel has not taken, over every client connection, stays
        under --max-client-memory: over it, the largest queues are cut first (Redis's
        maxmemory-clients). Only connections with a backlog are looked at."""
        cdef size_t i, kept = 0, total = 0
        cdef uint64_t handle
        cdef uint64_t* keys
        cdef int fd
        for i in range(self.backlog.length):
            handle = self.backlog.items[i]
            fd = self._conn_fd(handle)
            if fd < 0 or not (self.conns[fd].flags & F_EPOLLOUT):
                continue                # closed, or drained since
            self.backlog.items[kept] = handle
            kept += 1
            total += self._held(fd)
        self.backlog.length = kept
        if total <= self.memory_budget:
            return
        keys = <uint64_t*>malloc(kept * sizeof(uint64_t))
        if keys == NULL:
            return
        for i in range(kept):
            fd = handle_fd(self.backlog.items[i])
            keys[i] = (<uint64_t>min(self._held(fd), 0xFFFFFFFF) << 32) | <uint32_t>fd
        qsort(keys, kept, sizeof(uint64_t), by_size_descending)
        i = 0
        while total > self.memory_budget and i < kept:
            fd = <int><uint32_t>keys[i]
            total -= self._held(fd)
            self._close_for(fd, R_MEMORY_BUDGET)
            i += 1
        free(keys)

    cdef void _flush(self, int fd) noexcept:
        cdef conn_t* c = &self.conns[fd]
        if self._write_out(fd) <= 0:
            return
        # A closing connection waits for the answers still owed to it, then
        # says its last words (too_large, the WebSocket close) after them.
        if c.flags & (F_CLOSING | F_PEER_EOF) and c.inflight:
            return
        if c.flags & F_CLOSING and (c.flags & F_FINAL_TOO_LARGE or c.close_code):
            self._queue_final(fd)
            if self._write_out(fd) <= 0:
                return
        # everything went out: give the buffer back
        free(c.outbuf)
        c.outbuf = NULL
        c.outcap = 0
        if c.flags & F_EPOLLOUT:
            c.flags &= ~F_EPOLLOUT
            self._epoll_mod(fd, EPOLLIN | EPOLLRDHUP | EPOLLET)
        if c.flags & F_PEER_EOF:
            self._close(fd)
        elif c.flags & F_CLOSING and not (c.flags & F_SHUT):
            # half-close so the last answer is not lost to a reset; then drain
            shutdown(fd, SHUT_WR)
            c.flags |= F_SHUT
            c.last_active = self.now
            handles_push(&self.draining, make_handle(c.gen, fd))

    cdef void _sweep_draining(self) noexcept:
        cdef size_t i, kept = 0
        cdef uint64_t handle
        cdef int fd
        for i in range(self.draining.length):
            handle = self.draining.items[i]
            fd = self._conn_fd(handle)
            if fd < 0:
                continue
            if self.now - self.conns[fd].last_active >= DRAIN_SECONDS:
                self._close(fd)
                continue
            self.draining.items[kept] = handle
            kept += 1
        self.draining.length = kept

    # --------------------------------------------------------- liveness --
    cdef uint32_t _deadline(self, int fd) noexcept:
        cdef conn_t* c = &self.conns[fd]
        cdef uint32_t deadline = c.last_active + self.idle_timeout if self.idle_timeout else NO_DEADLINE
        # A login that arrived in time and waits on a busy server is not cut: while it is in
        # flight, only the idle timeout applies (other requests, heartbeats, do not count).
        if c.user == 0 and not (c.flags & F_LOGGING_IN) and self.login_timeout \
                and c.born + self.login_timeout < deadline:
            deadline = c.born + self.login_timeout
        return deadline

    cdef void _wheel_insert(self, int fd) noexcept:
        cdef uint32_t deadline = self._deadline(fd)
        cdef size_t slot
        if deadline == NO_DEADLINE:
            self.conns[fd].wheel_prev = self.conns[fd].wheel_next = NO_CONN - 1   # not in the wheel
            return
        if deadline <= self.wheel_now:
            deadline = self.wheel_now + 1
        slot = deadline % WHEEL_SLOTS
        self.conns[fd].wheel_slot = <uint16_t>slot
        self.conns[fd].wheel_prev = NO_CONN
        self.conns[fd].wheel_next = self.wheel[slot]
        if self.wheel[slot] != NO_CONN:
            self.conns[self.wheel[slot]].wheel_prev = fd
        self.wheel[slot] = fd

    cdef void _wheel_unlink(self, int fd) noexcept:
        cdef conn_t* c = &self.conns[fd]
        if c.wheel_next == NO_CONN - 1:
            return
        if c.wheel_prev != NO_CONN:
            self.conns[c.wheel_prev].wheel_next = c.wheel_next
        else:
            self.wheel[c.wheel_slot] = c.wheel_next
        if c.wheel_next != NO_CONN:
            self.conns[c.wheel_next].wheel_prev = c.wheel_prev
        c.wheel_prev = c.wheel_next = NO_CONN - 1

    cdef void _expire_idle(self) noexcept:
        """Visit the wheel slots of the seconds that passed: O(due connections).

        A connection that was active since it was slotted is re-slotted at its
        new deadline instead of being moved on every packet.
        """
        cdef int32_t fd, nxt
        cdef size_t slot
        cdef conn_t* c
        while self.wheel_now < self.now:
            self.wheel_now += 1
            slot = self.wheel_now % WHEEL_SLOTS
            fd = self.wheel[slot]
            self.wheel[slot] = NO_CONN
            while fd != NO_CONN:
                c = &self.conns[fd]
                nxt = c.wheel_next
                c.wheel_prev = c.wheel_next = NO_CONN - 1
                if self._deadline(fd) <= self.wheel_now:
                    self._set_reason(fd, R_LOGIN_TIMEOUT if c.user == 0 and self.login_timeout and
                                     c.born + self.login_timeout <= self.wheel_now else R_IDLE_TIMEOUT)
                    if c.state == S_WS:
                        self._ws_close(fd, 1001)
                    else:
                        self._begin_close(fd)
                else:
                    self._wheel_insert(fd)
                fd = nxt

    # ------------------------------------------------------------ close --
    cdef void _release(self, int fd) noexcept:
        cdef conn_t* c = &self.conns[fd]
        self._wheel_unlink(fd)
        if c.user and not (c.flags & F_LINK):
            self._presence_unlink(c.user, fd)
            self.counters[C_LOGGED_IN] -= 1
        if c.flags & F_COUNTED:
            address_release(&self.addresses, c.peer)
        free(c.inbuf)
        if c.flags & F_SHARED:
            self._unref(<pass_out_t*>c.outbuf)
        else:
            free(c.outbuf)
        c.ws.frag_active = 0
        ws_release(&c.ws)
        c.inbuf = NULL
        c.outbuf = NULL
        c.inlen = c.outlen = c.outcap = 0
        c.user = 0
        c.flags = 0
        c.deflate_bits = 0
        c.inflight = 0
        c.close_code = 0
        c.close_reason = R_PEER
        c.state = S_FREE

    cdef void _close(self, int fd) noexcept:
        cdef uint64_t user = self.conns[fd].user
        cdef uint64_t handle = make_handle(self.conns[fd].gen, fd)
        cdef bint link = self.conns[fd].flags & F_LINK
        if self.conns[fd].state < S_TCP:
            return
        if link:
            self.counters[C_LINKS] -= 1
        else:
            self.counters[C_CLOSED + self.conns[fd].close_reason] += 1
            self.counters[C_CONNECTIONS_TCP if self.conns[fd].state == S_TCP else C_CONNECTIONS_WS] -= 1
        self._release(fd)
        if user and not link and self.on_users_closed is not None:
            handles_push(&self.closed_users, user)
        if user and not link and self.on_user_gone is not None and not self._has_user(user):
            handles_push(&self.gone_users, user)
        if link and self.on_link_closed is not None:
            try:
                self.on_link_closed(handle)
            except BaseException:
                log.exception("link close handler failed")
        close(fd)                       # also removes it from the epoll set

    # --------------------------------------------------------- presence --
    cdef void _presence_unlink(self, uint64_t user, int fd) noexcept:
        cdef uint64_t* head = idmap_find(&self.presence, user)
        cdef int32_t cur, prev = NO_CONN
        if head == NULL:
            return
        cur = <int32_t>head[0]
        while cur != NO_CONN and cur != fd:
            prev = cur
            cur = self.conns[cur].next_dev
        if cur == NO_CONN:
            return
        if prev == NO_CONN:
            head[0] = <uint64_t><uint32_t>self.conns[fd].next_dev
        else:
            self.conns[prev].next_dev = self.conns[fd].next_dev
        self.conns[fd].next_dev = NO_CONN
        if <int32_t>head[0] == NO_CONN:
            idmap_delete(&self.presence, user)      # the user's last connection here

    cdef int32_t _first_conn(self, uint64_t user) noexcept:
        cdef uint64_t* head = idmap_find(&self.presence, user)
        return <int32_t>head[0] if head != NULL else NO_CONN

    cdef int _conn_fd(self, uint64_t handle) noexcept:
        """The fd of a live connection handle, or -1 if it is stale."""
        cdef int fd = handle_fd(handle)
        if handle == 0 or fd >= self.max_fds:
            return -1
        if self.conns[fd].gen != <uint32_t>(handle >> 32) or self.conns[fd].state < S_TCP:
            return -1
        return fd

    cdef bint _has_user(self, uint64_t user) noexcept:
        return idmap_find(&self.presence, user) != NULL

    def set_user(self, uint64_t conn, uint64_t user_id):
        """Bind a connection to a user (presence on this worker)."""
        cdef int fd = self._conn_fd(conn)
        cdef uint64_t* head
        if fd < 0 or user_id == 0:
            return False
        if self.conns[fd].user:
            self._presence_unlink(self.conns[fd].user, fd)
            if self.on_users_closed is not None:
                handles_push(&self.closed_users, self.conns[fd].user)   # its count moves
            self.conns[fd].user = 0
            self.counters[C_LOGGED_IN] -= 1
        head = idmap_insert(&self.presence, user_id, <uint64_t><uint32_t>NO_CONN)
        if head == NULL:
            raise MemoryError()
        self.counters[C_LOGGED_IN] += 1
        self.conns[fd].next_dev = <int32_t>head[0]
        head[0] = <uint64_t><uint32_t>fd
        self.conns[fd].user = user_id
        return True

    def conn_user(self, uint64_t conn):
        """The user id bound to a connection (0: none, or the connection is gone)."""
        cdef int fd = self._conn_fd(conn)
        return self.conns[fd].user if fd >= 0 else 0

    def conn_peer(self, uint64_t conn):
        """The connection's address key (see PEER_MARK: an IPv4 client's is its address
        as an int); 0: none, or the connection is gone."""
        cdef int fd = self._conn_fd(conn)
        return self.conns[fd].peer if fd >= 0 else 0

    def user_conn_count(self, uint64_t user_id):
        """How many connections the user has on this reactor (a walk of its list)."""
        cdef int32_t cur = self._first_conn(user_id)
        cdef size_t count = 0
        while cur != NO_CONN:
            count += 1
            cur = self.conns[cur].next_dev
        return count

    def address_count(self, uint32_t peer):
        """Connections counted under an address key, over every region of the address
        table (every worker; an overcount when keys share a slot); 0 when not counting."""
        if self.addresses.counts == NULL:
            return 0
        return address_count(&self.addresses, peer)

    def share_address_table(self, buffer, uint32_t index):
        """Worker mode: count connections per address in region ``index`` of a table
        the router made (shared memory, ``init_address_table``), and take its keys, so
        every worker gives an address the same key. Before any client connection;
        the region is cleared first (a restarted worker's predecessor's are gone)."""
        cdef address_table_t table
        cdef int fd
        for fd in range(self.high_fd + 1):
            if self.conns[fd].state >= S_TCP and not (self.conns[fd].flags & F_LINK):
                raise ValueError("share the address table before accepting clients")
        open_address_table(buffer, index, &table)
        clear_region(table.own)
        if self.addresses_local:
            free(self.addresses.counts)
            self.addresses_local = False
        self.addresses = table
        self.shared_addresses = memoryview(buffer)

    def user_conns(self, uint64_t user_id):
        """Handles of the user's connections on this worker."""
        cdef int32_t cur = self._first_conn(user_id)
        cdef list result = []
        while cur != NO_CONN:
            result.append(make_handle(self.conns[cur].gen, cur))
            cur = self.conns[cur].next_dev
        return result

    # ------------------------------------------------------------- send --
    def reply(self, uint64_t conn, int action, int seq, bytes payload):
        """Queue one packet to one connection; False if it is gone."""
        cdef int fd = self._conn_fd(conn)
        if fd < 0:
            return False
        return self._queue_packet(fd, action, seq, PyBytes_AS_STRING(payload), PyBytes_GET_SIZE(payload))

    def push_user(self, uint64_t user_id, int action, bytes payload, uint64_t exclude_conn=0):
        """Queue a push (seq 0) to every connection of a user; returns how many."""
        return self._push_user(user_id, action, PyBytes_AS_STRING(payload), PyBytes_GET_SIZE(payload),
                               exclude_conn)

    cdef int _push_user(self, uint64_t user_id, int action, const char* body, size_t length,
                        uint64_t exclude_conn) noexcept:
        cdef int32_t cur = self._first_conn(user_id), nxt
        cdef int count = 0
        while cur != NO_CONN:
            nxt = self.conns[cur].next_dev   # _queue_packet may drop cur
            if make_handle(self.conns[cur].gen, cur) != exclude_conn:
                count += self._queue_packet(cur, action, 0, body, length)
            cur = nxt
        self.counters[C_DELIVERIES_USER] += <uint64_t>count
        return count

    cdef group_t* _group(self, size_t group, bint create) noexcept:
        cdef group_t* grown
        cdef size_t cap
        if group >= self.groups_cap:
            if not create:
                return NULL
            cap = self.groups_cap * 2 if self.groups_cap else 64
            while cap <= group:
                cap *= 2
            grown = <group_t*>realloc(self.groups, cap * sizeof(group_t))
            if grown == NULL:
                return NULL
            memset(grown + self.groups_cap, 0, (cap - self.groups_cap) * sizeof(group_t))
            self.groups = grown
            self.groups_cap = cap
        return &self.groups[group]

    def group_add(self, size_t group, uint64_t conn, bint check_duplicate=True):
        """Add a connection to a channel group (this worker's push list)."""
        cdef group_t* g
        cdef uint64_t* grown
        cdef size_t cap
        if self._conn_fd(conn) < 0:
            return False
        g = self._group(group, True)
        if g == NULL:
            raise MemoryError()
        if check_duplicate and member_index(g, conn) >= 0:
            return False
        if g.length == g.capacity:
            cap = g.capacity * 2 if g.capacity else 8
            grown = <uint64_t*>realloc(g.members, cap * sizeof(uint64_t))
            if grown == NULL:
                raise MemoryError()
            g.members = grown
            g.capacity = <uint32_t>cap
        g.members[g.length] = conn
        g.length += 1
        return True

    def group_remove(self, size_t group, uint64_t conn):
        """Remove a connection from a group (closed connections drop out by themselves)."""
        cdef group_t* g = self._group(group, False)
        cdef ssize_t i = member_index(g, conn) if g != NULL else -1
        if i < 0:
            return False
        g.length -= 1
        g.members[i] = g.members[g.length]
        return True

    def group_has(self, size_t group, uint64_t conn):
        """Whether a connection is in a group (a scan of the group)."""
        cdef group_t* g = self._group(group, False)
        return g != NULL and member_index(g, conn) >= 0

    def broadcast(self, size_t group, int action, bytes payload, uint64_t exclude_conn=0):
        """Queue one push to every live member of a group in one C loop; returns how many."""
        return self._broadcast(group, action, PyBytes_AS_STRING(payload), PyBytes_GET_SIZE(payload),
                               &exclude_conn, 1 if exclude_conn else 0, NULL)

    def broadcast_except(self, size_t group, int action, bytes payload, excluded):
        """``broadcast`` leaving out every connection of ``excluded`` (handles);
        returns (how many were queued, the excluded connections that are members)."""
        cdef list handles = sorted(set(excluded))
        cdef size_t n = len(handles), i
        cdef uint64_t* sorted_handles = <uint64_t*>malloc(max(n, 1) * sizeof(uint64_t))
        cdef uint8_t* found = <uint8_t*>calloc(max(n, 1), 1)
        cdef int count
        if sorted_handles == NULL or found == NULL:
            free(sorted_handles)
            free(found)
            raise MemoryError()
        try:
            for i in range(n):
                sorted_handles[i] = handles[i]
            count = self._broadcast(group, action, PyBytes_AS_STRING(payload), PyBytes_GET_SIZE(payload),
                                    sorted_handles, n, found)
            return count, [sorted_handles[i] for i in range(n) if found[i]]
        finally:
            free(sorted_handles)
            free(found)

    cdef int _broadcast(self, size_t group, int action, const char* body, size_t length,
                        const uint64_t* excluded, size_t n_excluded, uint8_t* found) noexcept:
        """Frame the push once per framing into the group's pass buffer; each
        member gets its slice of it (or a copy when it has other output queued).
        ``excluded``: sorted handles left out; ``found[k]`` (if not NULL) is set
        when excluded[k] is a member."""
        cdef group_t* g = self._group(group, False)
        cdef pass_out_t* p
        cdef size_t i = 0
        cdef uint32_t start[FRAMINGS]
        cdef uint32_t end[FRAMINGS]
        cdef uint64_t handle
        cdef int fd, kind, count = 0
        cdef int deflate = 0            # compressed framing: 0 not tried yet, 1 framed, -1 none (plain)
        if g == NULL:
            return 0
        memset(start, 0, sizeof(start))
        memset(end, 0, sizeof(end))
        p = self._pass_out(group, g)
        while i < g.length:
            handle = g.members[i]
            fd = self._conn_fd(handle)
            if fd < 0:                  # closed since it joined: drop it here
                g.length -= 1
                g.members[i] = g.members[g.length]
                continue
            i += 1
            if n_excluded and is_excluded(handle, excluded, n_excluded, found):
                continue
            kind = FRAMING_WS if self.conns[fd].state == S_WS else FRAMING_TCP
            if kind == FRAMING_WS and p != NULL and deflate >= 0 and ws_deflate_fits(
                    self.conns[fd].deflate_bits, length + WS_PACKET_HEADER):
                if deflate == 0:        # compressed once, for every deflate member
                    deflate = 1 if self._frame_deflated(&p.framed[FRAMING_DEFLATE], action, body, length,
                                                        &start[FRAMING_DEFLATE], &end[FRAMING_DEFLATE]) else -1
                if deflate == 1:
                    kind = FRAMING_DEFLATE
            if p != NULL and end[kind] == 0 and not self._frame_shared(
                    &p.framed[kind], kind, action, body, length, &start[kind], &end[kind]):
                p = NULL                # out of memory: copy into each member instead
            if p == NULL or (self.conns[fd].state != S_TCP and self.conns[fd].state != S_WS):
                count += self._queue_packet(fd, action, 0, body, length)
            else:
                count += self._queue_shared(fd, p, kind, start[kind], end[kind])
        self.counters[C_DELIVERIES_CHANNEL] += <uint64_t>count
        return count

    cdef pass_out_t* _pass_out(self, size_t group, group_t* g) noexcept:
        """The group's buffer for this pass (made on its first broadcast); NULL: no memory."""
        cdef pass_out_t* p = g.pass_out
        if p != NULL:
            return p
        p = <pass_out_t*>calloc(1, sizeof(pass_out_t))
        if p == NULL:
            return NULL
        p.refs = 1                      # the pass's own reference, dropped by _end_pass
        p.group = group
        handles_push(&self.pass_outs, <uint64_t><size_t>p)
        if self.pass_outs.length == 0 or self.pass_outs.items[self.pass_outs.length - 1] != <uint64_t><size_t>p:
            free(p)                     # could not list it for _end_pass
            return NULL
        g.pass_out = p
        return p

    cdef bint _frame_shared(self, shared_buf_t* buf, int kind, int action, const char* body,
                            size_t length, uint32_t* start, uint32_t* end) noexcept:
        """Append one push packet to a pass buffer; its bytes are [start, end)."""
        cdef size_t need = buf.length + WS_MAX_FRAME_HEADER + WS_PACKET_HEADER + length
        if need > buf.capacity and (need > self.outbuf_limit or not grow(&buf.data, &buf.capacity,
                                                                        need, 4096)):
            return False
        start[0] = buf.length
        if kind:
            buf.length += <uint32_t>ws_packet_header(buf.data + buf.length, length, action, 0)
        else:
            buf.length += <uint32_t>tcp_header(buf.data + buf.length, length, action, 0)
        memcpy(buf.data + buf.length, body, length)
        buf.length += <uint32_t>length
        end[0] = buf.length
        return True

    cdef bint _frame_deflated(self, shared_buf_t* buf, int action, const char* body, size_t length,
                              uint32_t* start, uint32_t* end) noexcept:
        """Append the push, compressed, to a pass buffer; False when it goes out
        uncompressed (too short or not made smaller) or there is no memory."""
        cdef size_t deflated = ws_deflate(&self.z, action, 0, body, length)
        cdef size_t need = buf.length + WS_MAX_FRAME_HEADER + deflated
        if deflated == 0:
            return False
        if need > buf.capacity and (need > self.outbuf_limit or not grow(&buf.data, &buf.capacity,
                                                                        need, 4096)):
            return False
        start[0] = buf.length
        buf.length += <uint32_t>ws_deflated_header(buf.data + buf.length, deflated)
        memcpy(buf.data + buf.length, self.z.deflated, deflated)
        buf.length += <uint32_t>deflated
        end[0] = buf.length
        self.counters[C_DEFLATED_OUT] += 1
        return True

    cdef inline int _slice_framing(self, conn_t* c) noexcept:
        """Which of its pass buffer's framings a sharing member's slice is in."""
        if c.flags & F_SHARED_DEFLATE:
            return FRAMING_DEFLATE
        return FRAMING_WS if c.state == S_WS else FRAMING_TCP

    cdef bint _queue_shared(self, int fd, pass_out_t* p, int kind, uint32_t start,
                            uint32_t end) noexcept:
        """Give a member bytes [start, end) of a pass buffer: by reference when it
        has nothing else queued (or its slice ends at start), else as a copy."""
        cdef conn_t* c = &self.conns[fd]
        cdef char* out
        if c.flags & F_SHUT:
            return False
        if c.flags & F_SHARED and <pass_out_t*>c.outbuf == p and c.outcap + c.outlen == start \
                and self._slice_framing(c) == kind:
            c.outlen += end - start     # the next message of the same pass: still one slice
            return True
        if c.outlen == 0 and not (c.flags & F_SHARED):
            free(c.outbuf)              # an empty own buffer kept by a waiting close
            c.outbuf = <char*>p
            c.outcap = start
            c.outlen = end - start
            c.flags |= F_SHARED | (F_SHARED_DEFLATE if kind == FRAMING_DEFLATE else 0)
            p.refs += 1
            self._mark_pending(fd)
            return True
        out = self._reserve(fd, end - start)
        if out == NULL:
            return False
        memcpy(out, p.framed[kind].data + start, end - start)
        c.outlen += end - start
        return True

    cdef int _write_shared(self, int fd) noexcept:
        """Write a member's slice straight from the pass buffer; what the kernel
        does not take is copied into the member's own buffer. -1: closed."""
        cdef conn_t* c = &self.conns[fd]
        cdef pass_out_t* p = <pass_out_t*>c.outbuf
        cdef ssize_t n
        while True:
            n = write(fd, p.framed[self._slice_framing(c)].data + c.outcap, c.outlen)
            if n >= 0 or errno != EINTR:
                break
        if n < 0:
            if errno != EAGAIN:
                self._close(fd)         # EPIPE, ECONNRESET: the peer is gone
                return -1
            n = 0
        self.counters[C_BYTES_OUT] += <uint64_t>n
        return 0 if self._unshare(fd, n) else -1

    cdef bint _unshare(self, int fd, size_t sent) noexcept:
        """Turn a member's slice into its own buffer, minus the first ``sent``
        bytes (already written). False: out of memory, the connection was closed."""
        cdef conn_t* c = &self.conns[fd]
        cdef pass_out_t* p = <pass_out_t*>c.outbuf
        cdef size_t rest = c.outlen - sent
        cdef char* own = NULL
        if rest:
            own = <char*>malloc(rest)
            if own != NULL:
                memcpy(own, p.framed[self._slice_framing(c)].data + c.outcap + sent, rest)
        c.flags &= ~(F_SHARED | F_SHARED_DEFLATE)
        c.outbuf = own
        c.outlen = c.outcap = <uint32_t>(rest if own != NULL else 0)
        self._unref(p)
        if rest and own == NULL:
            self._close_for(fd, R_NO_MEMORY)
            return False
        return True

    cdef void _unref(self, pass_out_t* p) noexcept:
        cdef int framing
        p.refs -= 1
        if p.refs == 0:
            for framing in range(FRAMINGS):
                free(p.framed[framing].data)
            free(p)

    cdef void _end_pass(self) noexcept:
        """After the flush: the next broadcasts start new pass buffers. Slices
        still queued (a member the kernel did not take all from) keep theirs alive."""
        cdef handle_list_t batch = handles_take(&self.pass_outs)
        cdef pass_out_t* p
        cdef size_t i
        for i in range(batch.length):
            p = <pass_out_t*><size_t>batch.items[i]
            if p.group < self.groups_cap and self.groups[p.group].pass_out == p:
                self.groups[p.group].pass_out = NULL
            self._unref(p)
        free(batch.items)

    def adopt_link(self, int fd):
        """Serve an already connected socket as a trusted link to another zim
        process (TCP framing, packets up to ``link_max_packet`` either way, no
        timeouts or output cap). A frame over that limit, or a broken one, closes
        it at once, writing nothing into it."""
        if fd < 0 or fd >= self.max_fds or self.conns[fd].state != S_FREE:
            raise ValueError("bad link descriptor")
        os.set_blocking(fd, False)      # edge-triggered reads must never block
        self._claim_or_raise(fd, S_TCP, F_LINK, EPOLLIN | EPOLLRDHUP | EPOLLET)
        self.counters[C_LINKS] += 1
        return make_handle(self.conns[fd].gen, fd)

    def hold(self, uint64_t conn):
        """Single-process mode: this request is answered later, by ``answer()``
        (e.g. once the store has committed it). A close waits for the answer, and
        a connection not logged in has its next requests held until then, so a
        login pipelined with a send is decided first. False if the connection is gone."""
        cdef int fd = self._conn_fd(conn)
        cdef conn_t* c
        if fd < 0:
            return False
        c = &self.conns[fd]
        if c.inflight < 0xFFFF:
            c.inflight += 1
        if c.user == 0 or c.inflight >= self.max_inflight:
            c.flags |= F_PAUSED
        return True

    def answer(self, uint64_t conn, int action, int seq, bytes payload):
        """Queue the answer to a request held by ``hold()`` and resume the connection."""
        cdef int fd = self._conn_fd(conn)
        cdef bint queued
        if fd < 0:
            return False
        queued = self._queue_packet(fd, action, seq, PyBytes_AS_STRING(payload),
                                              PyBytes_GET_SIZE(payload))
        if self._conn_fd(conn) == fd:       # a full output buffer may have dropped it
            self._answered(fd)
            if self.conns[fd].inflight < self.max_inflight:
                self._resume(fd)
        return queued

    cdef void _answered(self, int fd) noexcept:
        if self.conns[fd].inflight:
            self.conns[fd].inflight -= 1
            if self.conns[fd].flags & (F_CLOSING | F_PEER_EOF):
                self._mark_pending(fd)          # may be free to close now
            elif self.conns[fd].inflight == 0 and self.conns[fd].flags & F_LOGGING_IN:
                self.conns[fd].flags &= ~F_LOGGING_IN
                if self.conns[fd].user == 0 and self.login_timeout:
                    # the login failed: its deadline applies again
                    self._wheel_unlink(fd)
                    self._wheel_insert(fd)

    cdef void _resume(self, int fd) noexcept:
        """Release a paused connection: its buffered requests are read next pass."""
        if self.conns[fd].flags & F_PAUSED:
            self.conns[fd].flags &= ~F_PAUSED
            self.conns[fd].flags |= F_READ_AGAIN
            handles_push(&self.again, make_handle(self.conns[fd].gen, fd))

    # ------------------------------------------------ worker fast path --
    def forward_to(self, uint64_t link, bytes routes):
        """Worker mode: client requests go to ``link`` from C, and the router's
        reply, push and broadcast commands on it are carried out in C.

        ``routes`` has one byte per action: 0 unknown, 1 open, 2 login needed.
        Anything else on the link still goes to ``on_packet``.
        """
        if len(routes) != 65536:
            raise ValueError("routes must have 65536 bytes")
        free(self.route_table)
        self.route_table = <uint8_t*>malloc(65536)
        if self.route_table == NULL:
            raise MemoryError()
        memcpy(self.route_table, PyBytes_AS_STRING(routes), 65536)
        self.link = link

    cdef void _forward(self, int fd, packet_t* pkt) noexcept:
        """A client request, checked and sent up the link: handle(8) user(8) body."""
        cdef conn_t* c = &self.conns[fd]
        cdef uint8_t route = self.route_table[pkt.action]
        cdef int link_fd = self._conn_fd(self.link)
        cdef char* out
        cdef char text[160]
        cdef int n
        if route == 0:
            n = snprintf(text, sizeof(text),
                         b'{"error":{"code":"unknown_action","message":"unknown action %d"}}', pkt.action)
            self._queue_packet(fd, pkt.action, pkt.seq, text, n)
            self.counters[C_ERR_UNKNOWN_ACTION] += 1
            return
        if route == 2 and c.user == 0:
            self._queue_packet(fd, pkt.action, pkt.seq, _NOT_LOGGED_IN_BODY, len(_NOT_LOGGED_IN_BODY))
            self.counters[C_ERR_NOT_LOGGED_IN] += 1
            return
        if link_fd < 0:
            self._queue_packet(fd, pkt.action, pkt.seq, _INTERNAL_BODY, len(_INTERNAL_BODY))
            self.counters[C_ERR_NO_ROUTER] += 1
            return
        out = self._reserve(link_fd, TCP_HEADER + 16 + pkt.body_len)
        if out == NULL:
            return
        tcp_header(out, 16 + pkt.body_len, pkt.action, pkt.seq)
        put64(out + TCP_HEADER, make_handle(c.gen, fd))
        # not logged in: the address key instead, marked (App.serve tells them apart)
        put64(out + TCP_HEADER + 8, c.user if c.user else PEER_MARK_C | c.peer)
        memcpy(out + TCP_HEADER + 16, pkt.body, pkt.body_len)
        self.conns[link_fd].outlen += <uint32_t>(TCP_HEADER + 16 + pkt.body_len)
        if c.inflight < 0xFFFF:
            c.inflight += 1             # a close waits for the answer
        if c.user == 0 or c.inflight >= self.max_inflight:
            # it may be logging in: hold its next requests until this answer; or it has
            # enough waiting already: read no more of it (its requests stay in the kernel)
            c.flags |= F_PAUSED

    cdef void _route_request(self, int fd, packet_t* pkt) noexcept:
        """Router mode: a worker's forwarded request, straight to ``on_request``.

        The link slot's ``user`` field holds the worker index + 1 (set_link_index),
        which goes into the top 8 bits of the connection id.
        """
        cdef uint64_t conn = ((self.conns[fd].user - 1) << HANDLE_BITS) | (get64(pkt.body) & HANDLE_MASK)
        try:
            self.on_request(conn, get64(pkt.body + 8), pkt.action, pkt.seq,
                            PyBytes_FromStringAndSize(pkt.body + 16, pkt.body_len - 16))
        except BaseException:
            log.exception("request handler failed")

    # Router mode: the commands a worker runs in C (_run_command), packed here.
    cdef char* _command(self, uint64_t link, int command, size_t head, bytes payload) noexcept:
        """Queue a command packet carrying payload after a head of fixed fields;
        returns where the caller writes the head (NULL: the link is gone, or the
        packet would be over the links' limit)."""
        cdef int fd = self._conn_fd(link)
        cdef size_t length = PyBytes_GET_SIZE(payload)
        cdef char* out
        if fd < 0:
            return NULL
        if TCP_HEADER + head + length > self.link_max_packet:
            self._refuse_link_packet(command, TCP_HEADER + head + length)
            return NULL
        out = self._reserve(fd, TCP_HEADER + head + length)
        if out == NULL:
            return NULL
        tcp_header(out, head + length, command, 0)
        memcpy(out + TCP_HEADER + head, PyBytes_AS_STRING(payload), length)
        self.conns[fd].outlen += <uint32_t>(TCP_HEADER + head + length)
        return out + TCP_HEADER

    def command_reply(self, uint64_t link, uint64_t conn, int action, int seq, bint response,
                      bytes payload):
        """Tell a worker to queue a packet to one of its connections."""
        cdef char* out = self._command(link, CMD_REPLY, 13, payload)
        if out != NULL:
            put64(out, conn)
            put16(out + 8, action)
            put16(out + 10, seq)
            out[12] = <char>response
        return out != NULL

    def command_push_user(self, uint64_t link, uint64_t user, uint64_t exclude, int action,
                          bytes payload):
        """Tell a worker to push to its connections of a user."""
        cdef char* out = self._command(link, CMD_PUSH_USER, 18, payload)
        if out != NULL:
            put64(out, user)
            put64(out + 8, exclude)
            put16(out + 16, action)
        return out != NULL

    def command_broadcast(self, uint64_t link, uint32_t group, uint64_t exclude, int action,
                          bytes payload):
        """Tell a worker to push to its members of a channel group."""
        cdef char* out = self._command(link, CMD_BROADCAST, 14, payload)
        if out != NULL:
            put32(out, group)
            put64(out + 4, exclude)
            put16(out + 12, action)
        return out != NULL

    def set_link_index(self, uint64_t link, uint32_t index):
        """Router mode: which worker a link leads to (0..255)."""
        cdef int fd = self._conn_fd(link)
        if fd >= 0 and self.conns[fd].flags & F_LINK and index < 256:
            self.conns[fd].user = index + 1

    cdef bint _run_command(self, packet_t* pkt) noexcept:
        """Carry out a router command in C; False: leave it to Python."""
        cdef const char* b = pkt.body
        cdef size_t n = pkt.body_len
        cdef uint64_t handle
        cdef int fd
        if pkt.action == CMD_REPLY and n >= 13:     # conn(8) action(2) seq(2) response(1)
            fd = self._conn_fd(get64(b))
            if fd >= 0:
                self._queue_packet(fd, get16(b + 8), get16(b + 10), b + 13, n - 13)
                if b[12]:
                    self._answered(fd)
                    if self.conns[fd].inflight < self.max_inflight:
                        self._resume(fd)
            return True
        if pkt.action == CMD_PUSH_USER and n >= 18:  # user(8) exclude(8) action(2)
            self._push_user(get64(b), get16(b + 16), b + 18, n - 18, get64(b + 8))
            return True
        if pkt.action == CMD_BROADCAST and n >= 14:  # group(4) exclude(8) action(2)
            handle = get64(b + 4)
            self._broadcast(get32(b), get16(b + 12), b + 14, n - 14, &handle, 1 if handle else 0, NULL)
            return True
        return False

    def close(self, uint64_t conn):
        """Close a connection after flushing what is queued for it."""
        cdef int fd = self._conn_fd(conn)
        if fd >= 0:
            self._begin_close_for(fd, R_SERVER)

    def stats(self):
        """This reactor's figures (its counters by name, and a few sizes)."""
        cdef dict result = self.counters_dict()
        result["connections"] = (self.counters[C_CONNECTIONS_TCP] + self.counters[C_CONNECTIONS_WS]
                                 + self.counters[C_LINKS])
        result["users_online"] = self.presence.count
        result["conn_slot_bytes"] = sizeof(conn_t)
        return result

    def counters_dict(self):
        """The metric counters (COUNTER_NAMES) by name, gauges refreshed first."""
        cdef int i
        self._refresh_gauges()
        return {COUNTER_NAMES[i]: self.counters[i] for i in range(N_COUNTERS)}

    @property
    def refused(self):
        """Connections refused at the open-file limit so far."""
        return self.counters[C_CLOSED + R_FD_LIMIT]

    def share_counters(self, buffer):
        """Keep the counters in ``buffer`` (writable, COUNTER_BYTES long, e.g. a shared
        mmap) from now on, so another process can read them without asking. Totals
        already there are added to (a restarted worker goes on from its predecessor's);
        gauges are replaced by this reactor's."""
        cdef uint64_t[::1] region = memoryview(buffer).cast("B").cast("Q")
        cdef int i
        if region.shape[0] < N_COUNTERS:
            raise ValueError(f"the counters need {COUNTER_BYTES} bytes")
        for i in range(N_COUNTERS):
            if i < FIRST_GAUGE:
                region[i] += self.counters[i]
            else:
                region[i] = self.counters[i]
        self.shared_counters = region
        self.counters = &region[0]

    cdef void _refresh_gauges(self) noexcept:
        """Output queued: a scan of the table (once a second and per scrape, never per packet)."""
        cdef uint64_t total = 0, largest = 0, links = 0
        cdef int fd
        cdef conn_t* c
        for fd in range(self.high_fd + 1):
            c = &self.conns[fd]
            if c.state < S_TCP or c.outlen == 0:
                continue
            if c.flags & F_LINK:
                links += c.outlen
            else:
                total += c.outlen
                if c.outlen > largest:
                    largest = c.outlen
        self.counters[C_OUTBUF_BYTES] = total
        self.counters[C_OUTBUF_MAX_BYTES] = largest
        self.counters[C_LINK_QUEUE_BYTES] = links
