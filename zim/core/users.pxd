# Who is connected (core/users.pyx): users' connections on this reactor (presence), and
# what the owner is told when they leave.
from libc.stdint cimport int32_t, uint64_t

from zim._idmap cimport idmap_t

cdef enum:
    CLOSED_USERS_PART = 1 << 20     # user ids per on_users_closed call (8 MiB, under a link's limit)

cdef class Users(Timers):
    cdef idmap_t presence               # user id -> first connection fd (next: conn.next_dev)
    cdef readonly object on_user_gone     # callable(user_id): its last connection here closed
    cdef readonly object on_users_closed  # callable(bytes): 8-byte user ids, one per logged-in close
    cdef handle_list_t gone_users       # reported after the pass, never from inside a C loop
    cdef handle_list_t closed_users     # ... gathered over the pass (see _report_closed_users)

    cdef void _unbind(self, int fd) noexcept
    cdef void _user_closed(self, uint64_t user) noexcept
    cdef void _presence_unlink(self, uint64_t user, int fd) noexcept
    cdef int32_t _first_conn(self, uint64_t user) noexcept
    cdef bint _has_user(self, uint64_t user) noexcept
    cdef void _report_gone_users(self) noexcept
    cdef void _report_closed_users(self) noexcept
    cdef int _push_user(self, uint64_t user_id, int action, const char* body, size_t length,
                        uint64_t exclude_conn) noexcept
