"""connflood: open, log in and hold many zim connections (C10M-style load).

    tools/connflood --host 127.0.0.1 --port 8081 --connections 1000000 --processes 56 \\
                    --login --hold 60 --json

(``zim-connflood`` is the same program, installed with the package.)

N connections from K processes (each process holds at most 19,000: the
open-files limit here is 20,000 per process). Only loopback targets are
accepted.

Source ports. Towards a loopback target every socket is bound to its own
source address in 127.0.0.0/8 (127.2.0.1 and up) with IP_BIND_ADDRESS_NO_PORT,
so the kernel chooses the source port at connect() time for the whole 4-tuple,
from the stock ``ip_local_port_range`` (32768-60999): a port is shared by
sockets of different source addresses, and nothing needs the range widened.
Measured on Linux 6.18, one target port: 32,000 connections from 127.0.0.1
alone stop at the range's 28,232 ports (EADDRNOTAVAIL); 48,000 from spread
source addresses all connect, on about 9,600 ports per 16,000; 200,000 from 12
processes all connect on the stock range. Choosing ports ourselves was not
needed (and binding fixed ports would collide with other programs' listeners).

Phases, each bounded in time:
1. connect (``--rate`` new connections per second in all, 0: as fast as it
   goes, at most ``--inflight`` unfinished per process), WebSocket handshake
   with ``--ws``, login (action 1) with ``--login``;
2. hold ``--hold`` seconds once every process has connected: every connection
   sends a heartbeat (action 9) each ``--heartbeat`` seconds (spread out),
   reads and discards what comes; meanwhile a probe measures what a user feels
   at that scale: the round trip of a private message between two extra
   clients (A -> B, B answers on the push, A times the push), and a channel
   message to ``--probe-sample`` held connections (subscribed after their
   login) with its delivery latency. The hold lasts at least 1 s after the
   probe ends (its last pushes land);
3. close everything and print a summary, and with ``--json`` one JSON object
   as the last line of stdout.

Accounting: every one of the N connections is counted once, as ``connected``
(set up: connected, WebSocket handshake with ``--ws``, logged in with
``--login``), ``failed`` (never set up; ``errors`` by kind, ``timed_out`` for
the ones unfinished at ``--connect-timeout``) or ``unaccounted``:
``connected + failed + unaccounted == N``. Each client process sends its
running totals to this process every half second and its final figures when
told to stop; this process reads the processes' pipes all the time, in every
phase. A process that dies, or that does not answer within
``--report-timeout`` seconds (it is then killed), is listed in
``lost_processes``: its last report counts, the rest of its share is
``unaccounted``. ``closed`` counts connections (among the connected) closed
afterwards, by kind (``closed_by_server``, ``ECONNRESET``...);
``open_at_end`` the ones still open when the hold ended.

Exit code: 0 when all N connected and none was closed; 1 when some failed or
were closed; 3 when some are unaccounted or a client process was lost (2:
bad arguments).

A live progress line goes to stderr, and the lines ``holding: ...`` when the
hold starts after the probe and ``stopping: ...`` when the hold ends (a bench
can sample the server in between). The per-connection work is a few
non-blocking system calls on one epoll per process; framing is zim.client's codec.

Where things are: ``options`` (the command line and the constants),
``flood`` (a client process: its connections on one epoll, and its reports),
``parent`` (starting the processes, collecting their reports, the summary)
and ``probe`` (what a user feels while the connections are held).
"""
from zim.connflood.parent import main

__all__ = ["main"]
