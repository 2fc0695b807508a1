"""The connection to PostgreSQL, served by the reactor without a thread.

``PgLink`` drives libpq through psycopg's low-level ``psycopg.pq.PGconn`` in
non-blocking mode: the connection is made with ``connect_start``/
``connect_poll``, then put in pipeline mode, so many transactions may be on the
wire at once without waiting for each other's answers. libpq (C) speaks the
protocol; this module only decides when to read and write, from the loop, the
way zim.nodes.link serves Redis.

- ``transaction([(sql, params), ...])`` sends the statements followed by a
  Sync: PostgreSQL runs everything up to a Sync as one implicit transaction,
  so either all of them are committed or none. It returns a
  ``zim.pending.Pending`` settled from the loop, in the order of the calls:
  ``ok=True`` with one list of rows per statement (each row a tuple of the
  values' text as bytes, None for NULL) once PostgreSQL has committed;
  ``ok=False`` with a reason (str) if PostgreSQL refused a statement (the
  transaction was rolled back) or the connection was lost before the answer
  (it may have been committed or not: callers retry, and what they write is
  idempotent). Nothing is ever dropped without its Pending saying so.
- Parameters are text (str, int, float, bytes, None), typed by the SQL
  (``$1::bigint``); results come back in text format.
- At most ``max_waiting`` transactions wait at once; one more fails at once
  (``"archive link full"``), the caller's queue keeps its messages.
- A lost connection (closed, reset, or no answer for ``reply_timeout`` seconds
  while transactions wait, or a connect that does not finish in that time)
  fails what waits on it; while down, new calls fail at once; the link
  reconnects by itself after ``backoff_delay(failures)`` seconds. Calls made
  while connecting are sent once it is up.
- The reactor watches one descriptor: an epoll set of the link's own holding
  libpq's socket (edge-triggered, in and out), as RedisLink does. libpq may
  replace its socket while connecting (another address of the host): the set
  follows it. An edge comes once, and libpq reads at most its buffer (16 KiB
  at first) per read, and reads by itself while it sends: so each wake-up
  (``_pump``) sends, reads and settles until neither the socket nor libpq's
  buffer holds an answer.
- No thread: libpq does the protocol in C and the loop only moves bytes
  (``bench/archive.py``: a few µs of this process's CPU per archived message
  in batches of 100 or more).
"""
from __future__ import annotations

import logging
import select
from collections import deque
from typing import Any, Callable, Sequence

from psycopg import OperationalError, pq

from zim._core import Reactor
from zim.archive.config import check_dsn
from zim.backoff import FIRST_BACKOFF, MAX_BACKOFF
from zim.pending import Pending
from zim.servicelink import CONNECTING, UP, ServiceLink


REPLY_TIMEOUT = 10.0        # seconds without any answer while transactions wait: the link is dead
MAX_WAITING = 64            # transactions sent or queued at once

Statement = tuple[str, Sequence[Any]]
_EVENTS = select.EPOLLIN | select.EPOLLOUT | select.EPOLLRDHUP | select.EPOLLET
_ROWS = (pq.ExecStatus.TUPLES_OK, pq.ExecStatus.COMMAND_OK)


def as_param(value: Any) -> bytes | None:
    """A parameter's text, as PostgreSQL reads it."""
    if value is None or isinstance(value, bytes):
        return value
    if isinstance(value, bool):
        return b"true" if value else b"false"
    if isinstance(value, (str, int, float)):
        return str(value).encode()
    raise TypeError(f"a statement parameter is str, int, float, bool, bytes or None, not {type(value).__name__}")


class Transaction(Pending):
    """Statements sent as one implicit transaction, and their results as they come."""

    __slots__ = ("statements", "results", "error")

    def __init__(self, statements: list[tuple[bytes, list[bytes | None]]]) -> None:
        super().__init__()
        self.statements = statements
        self.results: list[list[tuple]] = []
        self.error: str | None = None


class PgLink(ServiceLink):
    """A connection to PostgreSQL served by ``reactor``; see the module docstring.

    ``state`` is ``"connecting"``, ``"up"``, ``"down"`` (waiting to reconnect)
    or ``"closed"``; ``on_state(state)``, if given, learns every change to
    ``"up"`` or ``"down"``. A DSN libpq cannot parse raises ValueError here.
    """

    kind = "archive"
    waiting_noun = "transactions"
    log = logging.getLogger("zim.archive")

    def __init__(self, reactor: Reactor, dsn: str, *, reply_timeout: float = REPLY_TIMEOUT,
                 first_backoff: float = FIRST_BACKOFF, max_backoff: float = MAX_BACKOFF,
                 max_waiting: int = MAX_WAITING, on_state: Callable[[str], None] | None = None) -> None:
        self.dsn = check_dsn(dsn)
        self.max_waiting = max_waiting
        self._conn: pq.PGconn | None = None
        self._fd = -1                   # libpq's socket, as registered in the poller
        self._handling = False          # in _pump: calls only queue in libpq, the pump sends them
        self._queued: deque[Transaction] = deque()      # made while connecting
        self._sent: deque[Transaction] = deque()        # on the wire, oldest first
        super().__init__(reactor, reply_timeout=reply_timeout, first_backoff=first_backoff,
                         max_backoff=max_backoff, on_state=on_state)

    # -- calls -------------------------------------------------------------------
    def transaction(self, statements: Sequence[Statement]) -> Pending:
        """Run ``statements`` (``(sql, params)`` pairs) as one transaction; see the module docstring."""
        if not statements:
            raise ValueError("an empty transaction (it would have nothing to settle in order with)")
        encoded = [(sql.encode(), [as_param(value) for value in params]) for sql, params in statements]
        work = Transaction(encoded)
        if self.state is not UP and self.state is not CONNECTING:
            work.settle(False, f"archive link {self.state}: {self.last_error}")
        elif self.waiting >= self.max_waiting:
            work.settle(False, f"archive link full ({self.max_waiting} transactions waiting)")
        elif self.state is CONNECTING:
            self._queued.append(work)
        else:
            self._send(work)
            if not self._handling:      # else the wake-up being handled sends it at its end
                self._pump()
        return work

    @property
    def waiting(self) -> int:
        """Transactions sent (or queued) and not answered yet."""
        return len(self._queued) + len(self._sent)

    def _awaiting_answers(self) -> bool:
        return bool(self._sent)

    # -- connecting ----------------------------------------------------------------
    def _connect(self) -> None:
        self._start_connecting()
        conn = self._conn = pq.PGconn.connect_start(self.dsn.encode())
        conn.notice_handler = _ignore_notice
        if conn.status == pq.ConnStatus.BAD:
            self._lost(f"cannot connect: {_error_of(conn)}")
            return
        self._arm_stall_check()
        self._poll_connect()

    def _poll_connect(self) -> None:
        conn = self._conn
        while True:
            status = conn.connect_poll()
            if status == pq.PollingStatus.FAILED:
                self._lost(f"cannot connect: {_error_of(conn)}")
                return
            self._follow_socket(conn.socket)
            if status == pq.PollingStatus.OK:
                break
            # libpq waits to read or write: if the socket can already, the edge that
            # said so has passed (edge-triggered), so ask again now; else its next edge calls
            wanted = select.POLLIN if status == pq.PollingStatus.READING else select.POLLOUT
            if not _ready_now(conn.socket, wanted):
                return
        conn.nonblocking = 1
        conn.enter_pipeline_mode()
        self._became_up()
        queued, self._queued = self._queued, deque()
        for work in queued:
            if self.state is UP:
                self._send(work)
            else:       # a send failed: the link is down, this one fails too
                work.settle(False, f"archive link lost: {self.last_error}")
        if self.state is UP:
            self._pump()
        if self.on_state is not None and self.state is UP:
            self.on_state(UP)

    def _follow_socket(self, fd: int) -> None:
        if fd == self._fd:
            return
        if self._fd >= 0:
            try:
                self._poller.unregister(self._fd)
            except OSError:
                pass        # libpq closed it already
        self._poller.register(fd, _EVENTS)
        self._fd = fd

    # -- the wire ----------------------------------------------------------------------
    def _send(self, work: Transaction) -> None:
        conn = self._conn
        try:
            for sql, params in work.statements:
                conn.send_query_params(sql, params)
            conn.pipeline_sync()
        except OperationalError as exc:
            self._sent.append(work)
            self._lost(f"send failed: {str(exc).strip()}")
            return
        work.statements = []        # in libpq's buffer now: ours goes
        self._sent.append(work)

    def _on_ready(self) -> None:
        """The link's epoll set is readable: the socket connected, has answers,
        has room again, or broke."""
        self._poller.poll(0)        # empty the set's ready list (edge-triggered items)
        if self.state is CONNECTING:
            self._poll_connect()
        elif self.state is UP and not self._handling:
            self._pump()

    def _pump(self) -> None:
        """Send what libpq holds, read what the socket holds, settle what is answered,
        until a pass finds nothing more. Both edges are one-shot (edge-triggered), and
        libpq reads the socket by itself while it sends (so that neither side waits on
        the other's full buffer): answers may wait in libpq's buffer, or the socket,
        with no edge to come, so a wake-up ends only when neither holds any."""
        conn = self._conn
        self._handling = True
        try:
            while self._conn is conn:
                conn.flush()        # 1: more to send; the socket's next out-edge comes for it
                readable = _ready_now(self._fd, select.POLLIN)
                if readable:
                    conn.consume_input()
                if not self._settle_answers(conn) and not readable:
                    break
        except OperationalError as exc:
            if self._conn is conn:
                self._lost(f"connection broken: {str(exc).strip()}")
        finally:
            self._handling = False

    def _settle_answers(self, conn: pq.PGconn) -> int:
        """Settle the transactions libpq has whole answers for; returns how many results it read."""
        sent = self._sent
        read = gaps = 0
        while self._conn is conn and not conn.is_busy():
            result = conn.get_result()
            if result is None:      # the end of one statement's results, or nothing more
                gaps += 1
                if gaps > 1 or not sent:
                    break
                continue
            read += 1
            gaps = 0
            self._answers += 1
            if not sent:
                self._lost(f"an answer no transaction waits for ({result.status.name})")
                return read
            work = sent[0]
            status = result.status
            if status == pq.ExecStatus.PIPELINE_SYNC:
                sent.popleft()
                if work.error is None:
                    work.settle(True, work.results)
                else:
                    work.settle(False, work.error)
            elif status in _ROWS:
                work.results.append(_rows(result))
            elif status == pq.ExecStatus.PIPELINE_ABORTED:
                pass        # after an error: skipped, rolled back with it
            else:
                if work.error is None:
                    work.error = result.get_error_message().strip() or f"PostgreSQL answered {status.name}"
        if self._conn is conn and conn.status == pq.ConnStatus.BAD:
            self._lost(f"connection broken: {_error_of(conn)}")
        return read

    # -- failures and deadlines -----------------------------------------------------------
    def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        if self._fd >= 0:
            try:
                self._poller.unregister(self._fd)
            except OSError:
                pass
            self._fd = -1
        if conn is not None:
            conn.finish()

    def _fail_waiting(self, reason: str) -> None:
        # taken first: a callback may call again (and fail at once, the link being down)
        waiting = [*self._sent, *self._queued]
        self._sent, self._queued = deque(), deque()
        for work in waiting:
            work.settle(False, reason)


def _ready_now(fd: int, events: int) -> bool:
    probe = select.poll()
    probe.register(fd, events)
    return bool(probe.poll(0))


def _rows(result: pq.PGresult) -> list[tuple]:
    columns = range(result.nfields)
    return [tuple(result.get_value(row, column) for column in columns) for row in range(result.ntuples)]


def _error_of(conn: pq.PGconn) -> str:
    return conn.get_error_message().strip() or "unknown error"


def _ignore_notice(result: pq.PGresult) -> None:
    # "relation ... already exists, skipping" from CREATE TABLE IF NOT EXISTS: expected
    pass
