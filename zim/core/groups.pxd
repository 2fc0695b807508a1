# Channel groups and the broadcast path (core/groups.pyx).
from libc.stdint cimport uint8_t, uint32_t, uint64_t


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
    FRAMING_TCP_DEFLATE = 3 # TCP, body compressed (seq bit 15): the same for every such member
    FRAMINGS = 4

cdef struct pass_out_t:
    shared_buf_t framed[FRAMINGS]
    size_t refs             # members pointing into it, + 1 while its pass is open
    size_t group


cdef struct group_t:
    uint64_t* members       # connection handles; stale ones are dropped lazily
    uint32_t length
    uint32_t capacity
    pass_out_t* pass_out    # this pass's broadcasts to the group, NULL when none


cdef class Groups(Users):
    # channel groups, indexed by group id
    cdef group_t* groups
    cdef size_t groups_cap
    cdef handle_list_t pass_outs    # pass_out_t pointers of the groups broadcast to this pass

    cdef group_t* _group(self, size_t group, bint create) noexcept
    cdef int _broadcast(self, size_t group, int action, const char* body, size_t length,
                        const uint64_t* excluded, size_t n_excluded, uint8_t* found) noexcept
    cdef pass_out_t* _pass_out(self, size_t group, group_t* g) noexcept
    cdef bint _frame_shared(self, shared_buf_t* buf, int kind, int action, const char* body,
                            size_t length, uint32_t* start, uint32_t* end) noexcept
    cdef bint _frame_deflated(self, shared_buf_t* buf, int kind, int action, const char* body,
                              size_t length, uint32_t* start, uint32_t* end) noexcept
    cdef bint _queue_shared(self, int fd, pass_out_t* p, int kind, uint32_t start, uint32_t end) noexcept
    cdef int _write_shared(self, int fd) noexcept
    cdef bint _unshare(self, int fd, size_t sent) noexcept
    cdef void _end_pass(self) noexcept
