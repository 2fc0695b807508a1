# A connection's life (core/conns.pyx): its slot in the table, its states and flags, and
# the Connections layer, the first of the Reactor's chain of classes:
#   Connections -> Timers -> Users -> Groups -> Link -> Reactor
# Each layer is one concept in one file; a method a lower layer calls and a higher one
# defines is declared here (or in the lower layer's .pxd) and overridden above.
from libc.stdint cimport int32_t, uint8_t, uint16_t, uint32_t, uint64_t

from zim._codec cimport packet_t, static_table_t, ws_state_t, zcodec_t

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
    F_SHARED_DEFLATE = 1024     # ... and the slice is in its compressed framing (FRAMING_*DEFLATE)
    F_LOGGING_IN = 2048 # a login (action 1) of a connection not logged in waits for its answer
    F_COUNTED = 4096    # counted in the address table (--max-conns-per-address) under its peer key
    F_TCP_DEFLATE = 8192        # TCP, compression asked for at login: bodies go out compressed (SEQ_DEFLATED)

cdef enum:
    READS_PER_EVENT = 16        # fairness: a flooding peer yields after this many reads
    MAX_HANDSHAKE = 8192
    DRAIN_SECONDS = 5           # how long a closing connection may take to send EOF
    ACTION_LOGIN = 1            # the protocol's login: the one request the login timeout waits for
    NO_CONN = -1
    GEN_MASK = 0xFFFFFF         # handles fit in HANDLE_BITS (core/wire.pxd): gen(24) fd(32)


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


cdef inline uint32_t next_gen(uint32_t gen) noexcept nogil:
    gen = (gen + 1) & GEN_MASK
    return gen if gen else 1


cdef inline uint64_t make_handle(uint32_t gen, int fd) noexcept nogil:
    return (<uint64_t>gen << 32) | <uint32_t>fd


cdef inline int handle_fd(uint64_t handle) noexcept nogil:
    return <int><uint32_t>handle


cdef inline void set_reason(conn_t* c, uint8_t reason) noexcept nogil:
    """Why the server closes a connection; the first reason given stands."""
    if c.close_reason == R_PEER:
        c.close_reason = reason


cdef class Connections:
    cdef int epfd
    cdef int reserve_fd             # /dev/null, closed for a moment to refuse at the fd limit
    cdef int max_fds
    cdef int high_fd                # the highest descriptor claimed so far: table scans stop there
    cdef conn_t* conns
    cdef uint32_t now               # monotonic seconds, read once per pass
    cdef bint running
    cdef size_t max_packet
    cdef readonly size_t link_max_packet    # link_packet_limit(max_packet): links' packets, either way
    cdef char* scratch              # every read lands here and is parsed in place
    cdef size_t scratch_cap
    cdef size_t outbuf_limit
    cdef bint ws_deflate            # negotiate permessage-deflate with clients that offer it
    cdef object ws_origins          # None: any Origin; else a zim.origins.OriginPolicy
    cdef static_table_t static_paths    # plain GETs on the WebSocket port (--demo): path -> index
    cdef dict static_pages          # {path: response}: the table points into its keys
    cdef tuple static_responses     # by the table's index, the 404 last
    cdef zcodec_t z                 # the deflater and inflater every deflate connection shares
    cdef size_t tcp_deflate_min     # F_TCP_DEFLATE connections: shorter bodies go out plain
    cdef handle_list_t pending      # connections with queued output: flushed once per pass
    cdef handle_list_t again        # read budget ran out before EAGAIN: resume next pass
    cdef handle_list_t draining     # half-closed, draining input until EOF or a deadline
    cdef handle_list_t backlog      # client connections the kernel did not take all from (EPOLLOUT)
    cdef size_t memory_budget       # bytes of output the backlog may hold in all (0: no budget)
    cdef readonly object on_link_closed   # callable(conn): a link to another process closed
    # connections per address (--max-conns-per-address): see core/addresses.pyx
    cdef uint32_t max_conns_per_address     # 0: no limit
    cdef address_table_t addresses
    cdef bint addresses_local               # addresses.counts is ours (calloc), not shared
    cdef object shared_addresses            # keeps a shared table's buffer exported
    cdef bytes refuse_tcp, refuse_ws        # the refusal over the limit, one write each
    # metric counters (core/counters.pxd): own_counters, or memory another process reads
    cdef uint64_t* counters
    cdef uint64_t own_counters[N_COUNTERS]
    cdef object shared_counters         # keeps that memory's buffer exported while in use

    cdef int _limit_addresses(self, uint32_t max_conns_per_address) except -1
    cdef int _claim(self, int fd, uint8_t state, uint16_t flags, uint32_t events) noexcept
    cdef int _claim_or_raise(self, int fd, uint8_t state, uint16_t flags, uint32_t events) except -1
    cdef void _epoll_mod(self, int fd, uint32_t events) noexcept
    cdef int _conn_fd(self, uint64_t handle) noexcept
    cdef void _accept(self, int lfd) noexcept
    cdef void _refuse(self, int fd, uint8_t kind) noexcept
    cdef void _on_readable(self, int fd) noexcept
    cdef void _resume_reads(self) noexcept
    cdef size_t _process(self, int fd, uint32_t gen, size_t have) noexcept
    cdef void _link_broken(self, int fd, size_t offset, size_t have, int ev) noexcept
    cdef bint _handshake(self, int fd, size_t offset, size_t head_len) noexcept
    cdef char* _reserve(self, int fd, size_t extra) noexcept
    cdef void _mark_pending(self, int fd) noexcept
    cdef bint _queue_packet(self, int fd, int action, int seq, const char* body, size_t body_len) noexcept
    cdef void _refuse_link_packet(self, int action, size_t length) noexcept
    cdef void _queue_raw(self, int fd, bytes data) noexcept
    cdef void _queue_control(self, int fd, int opcode, const char* payload, size_t length) noexcept
    cdef void _ws_close(self, int fd, int code) noexcept
    cdef void _queue_final(self, int fd) noexcept
    cdef void _begin_close(self, int fd) noexcept
    cdef void _begin_close_for(self, int fd, uint8_t reason) noexcept
    cdef void _close_for(self, int fd, uint8_t reason) noexcept
    cdef void _flush_all(self) noexcept
    cdef int _write_out(self, int fd) noexcept
    cdef void _keep_to_budget(self) noexcept
    cdef void _flush(self, int fd) noexcept
    cdef void _sweep_draining(self) noexcept
    cdef void _release(self, int fd) noexcept
    cdef void _close(self, int fd) noexcept
    # defined by the layers above
    cdef void _wheel_insert(self, int fd) noexcept          # Timers: its deadline in the wheel
    cdef void _wheel_unlink(self, int fd) noexcept          # Timers: out of the wheel
    cdef void _unbind(self, int fd) noexcept                # Users: out of its user's presence list
    cdef void _user_closed(self, uint64_t user) noexcept    # Users: a logged-in client closed
    cdef bint _unshare(self, int fd, size_t sent) noexcept  # Groups: a broadcast slice made private
    cdef int _write_shared(self, int fd) noexcept           # Groups: write a broadcast slice
    cdef void _dispatch(self, int fd, packet_t* pkt) noexcept   # Link: where a packet goes
