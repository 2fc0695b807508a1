# Where a packet goes, and the router <-> worker link (core/link.pyx); the link's wire
# format is core/wire.pxd.
from libc.stdint cimport uint8_t, uint32_t, uint64_t

from zim._codec cimport packet_t

cdef class Link(Groups):
    cdef object on_packet               # callable(conn, action, seq, body): one complete request
    cdef uint32_t max_inflight          # requests of one connection in flight before it is not read
    cdef uint64_t link                  # worker mode: the router link (see forward_to)
    cdef uint8_t* route_table           # worker mode: per action, 0 unknown, 1 open, 2 login needed
    cdef readonly object on_request       # router mode: callable(conn, user, action, seq, body)

    cdef void _dispatch(self, int fd, packet_t* pkt) noexcept
    cdef void _answered(self, int fd) noexcept
    cdef void _resume(self, int fd) noexcept
    cdef void _forward(self, int fd, packet_t* pkt) noexcept
    cdef void _route_request(self, int fd, packet_t* pkt) noexcept
    cdef char* _command(self, uint64_t link, int command, size_t head, bytes payload) noexcept
    cdef bint _run_command(self, packet_t* pkt) noexcept
