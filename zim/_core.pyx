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

The code is laid out one concept a file, as uvloop's is: this file includes
zim/core/*.pyx below, zim/_core.pxd gathers their declarations (zim/core/*.pxd),
and the C headers are declared in zim/includes/. The Reactor is a chain of cdef
classes, one a file: Connections -> Timers -> Users -> Groups -> Link -> Reactor.
"""
from libc.stdint cimport INT64_MAX, int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t
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
    static_table_t, static_lookup, static_table_set, static_table_free,
    ws_deflate, ws_deflate_fits, ws_deflated_header, tcp_deflate, zcodec_free, SEQ_DEFLATED,
    EV_NEED_MORE, EV_PACKET, EV_TOO_LARGE, EV_BROKEN, EV_PING, EV_PONG,
    EV_CLOSE, EV_TEXT, EV_SKIP, EV_BAD_UTF8, EV_BAD_DEFLATE, TCP_HEADER, WS_MAX_FRAME_HEADER,
    WS_PACKET_HEADER, WS_DEFLATE_MIN,
)
from zim.includes.epoll cimport (
    epoll_event, epoll_create1, epoll_ctl, epoll_wait, EPOLL_CLOEXEC, EPOLL_CTL_ADD, EPOLL_CTL_MOD,
    EPOLL_CTL_DEL, EPOLLIN, EPOLLOUT, EPOLLRDHUP, EPOLLHUP, EPOLLERR, EPOLLET,
)
from zim.includes.socket cimport (
    socklen_t, sockaddr, sockaddr_storage, sockaddr_in, sockaddr_in6, accept4, shutdown, setsockopt,
    ntohl, SOCK_NONBLOCK, SOCK_CLOEXEC, SHUT_WR, IPPROTO_TCP, AF_INET, AF_INET6, TCP_NODELAY,
)
from zim.includes.memory cimport mallopt, malloc_trim, madvise, M_TRIM_THRESHOLD, MADV_REMOVE
from zim.includes.resource cimport rlimit, getrlimit, RLIMIT_NOFILE

import logging
import os
import socket

log = logging.getLogger("zim.core")

# One concept a file, in the order each builds on the last; their declarations
# (types, constants, the classes' fields and C methods) are in the .pxd files of the
# same names, gathered by zim/_core.pxd. One extension: every C call stays in the module.
include "core/counters.pyx"     # the metric counters' names
include "core/buffers.pyx"      # growable handle lists and buffers
include "core/addresses.pyx"    # the address table: connections per client address
include "core/conns.pyx"        # Connections: a connection's life (accept, read, frame, queue, flush, close)
include "core/timers.pyx"       # Timers: the timing wheel of connection deadlines, and Reactor.timer
include "core/users.pyx"        # Users: each user's connections (presence)
include "core/groups.pyx"       # Groups: channel groups and the broadcast path
include "core/link.pyx"         # Link: where a packet goes; the router <-> worker link
include "core/loop.pyx"         # Reactor: the constructor, the loop, listeners, watches, figures
