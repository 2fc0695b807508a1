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
    size_t slot             # its place in Groups.pass_table while its pass is open


# Most groups on a worker have one member there (issue 18: every worker holds a group
# for most channels), so one handle is kept inline in the 16-byte slot, and a group's
# pass buffer is found in a side table that lives only while a pass is open.
cdef union group_members_t:
    uint64_t* array         # capacity >= 2: the handles, malloc'd
    uint64_t one            # capacity 0: the one member (when length is 1)


cdef struct group_t:
    group_members_t members # connection handles; stale ones are dropped lazily
    uint32_t length
    uint32_t capacity       # 0: inline (at most one member); else the array's size


cdef class Groups(Users):
    # channel groups, indexed by group id
    cdef group_t* groups
    cdef size_t groups_cap
    cdef handle_list_t pass_outs    # pass_out_t pointers of the groups broadcast to this pass
    cdef pass_out_t** pass_table    # the same by group id (open addressing), emptied by _end_pass
    cdef size_t pass_table_cap      # a power of two (0: none yet)

    cdef group_t* _group(self, size_t group, bint create) noexcept
    cdef int _broadcast(self, size_t group, int action, const char* body, size_t length,
                        const uint64_t* excluded, size_t n_excluded, uint8_t* found) noexcept
    cdef pass_out_t* _pass_out(self, size_t group) noexcept
    cdef bint _grow_pass_table(self) noexcept
    cdef bint _frame_shared(self, shared_buf_t* buf, int kind, int action, const char* body,
                            size_t length, uint32_t* start, uint32_t* end) noexcept
    cdef bint _frame_deflated(self, shared_buf_t* buf, int kind, int action, const char* body,
                              size_t length, uint32_t* start, uint32_t* end) noexcept
    cdef bint _queue_shared(self, int fd, pass_out_t* p, int kind, uint32_t start, uint32_t end) noexcept
    cdef int _write_shared(self, int fd) noexcept
    cdef bint _unshare(self, int fd, size_t sent) noexcept
    cdef void _end_pass(self) noexcept
