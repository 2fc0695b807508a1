"""``SQLiteArchiver``: the PostgreSQL archive (``--archive``) behind a single server's SQLite.

SQLite stays the first tier: a message is acknowledged once the writer has
committed it, as without the archive. What the archive adds:

- **Write-behind, at least once.** The writer queues every message of an
  archived kind in the same transaction that stores it (``archive_queue``,
  zim.storage.sqlite_schema version 6: a position that only grows). Here, on
  the loop of the process that holds the ``DurableStore`` (no thread), the
  queue's oldest rows are read through the writer (``OP_ARCHIVE_PEEK``, at most
  ``--archive-batch``), upserted by message id into PostgreSQL in one
  transaction (``zim.archive.store.Archive.archive_messages``, which raises the
  conversations' seq counters with them), and only once PostgreSQL has
  committed are they taken off the queue (``OP_ARCHIVE_DONE``). A crash in
  between leaves them queued: the restarted server sends them again, and the
  upsert stores each message once. One batch is in flight at a time; while it
  is, new messages gather into the next.
- **Pruning keeps what is queued.** The writer prunes no message from its
  conversation's oldest queued one on (``write_prune``), so SQLite gives up
  nothing PostgreSQL has not confirmed.
- **Reads below SQLite.** A history page of an archived kind is read from SQLite
  with the lowest seq it stands for (``OP_HISTORY_SPAN``); the seqs missing at
  its bottom were pruned, so they are read from PostgreSQL (``Archive.history``)
  and the two parts make one page, with the same ``limit`` and ``hasMore``.
  PostgreSQL unreachable: such a read fails (the client gets the store-failure
  error), never a short page. Nothing read back goes into SQLite: it is not a cache.
- **PostgreSQL down.** Messages wait in the queue (in SQLite, durable) and the
  figures (``ArchiveStats``: link up, lag, pending, ...) say so; the link
  reconnects by itself and the queue drains. The schema is migrated at start
  (blocking, a short connect timeout); if PostgreSQL cannot be reached then, it
  is migrated over the link once it comes up (``migrate_on_link``), and nothing
  is written before.

Which kinds: ``--archive-kinds``. A channel is ``channel`` or ``large`` by its
member count when its messages are archived or read, as retention decides the tier.
"""
from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any, Union


from zim.archive.link import PgLink
from zim.archive.schema import migrate_at_start, migrate_on_link
from zim.archive.stats import ArchiveStats, LagLog
from zim.archive.store import Archive
from zim.ids import wall_clock_ms
from zim.pending import Pending
from zim.servicelink import UP
from zim.storage.store import CHANNEL, USER, ChannelKey, HistoryKind, PairKey
from zim.storage.writer import OP_ARCHIVE_DONE, OP_ARCHIVE_PEEK, OP_HISTORY_SPAN

if TYPE_CHECKING:
    from zim._core import Reactor

log = logging.getLogger("zim.archive")

GATHER_NS = 5_000_000           # a first message waits 5 ms for others to share its batch
MIGRATION_LOG_EVERY = 60        # failed migrations (one a second) per log line


class SQLiteArchiver:
    """The archive of one ``DurableStore`` (``store``: it calls the store's writer
    and reads its in-memory channels); see the module docstring."""

    def __init__(self, store: Any, dsn: str, kinds: frozenset[str], batch: int) -> None:
        self.store = store
        self.dsn = dsn
        self.kinds = kinds
        self.batch = batch
        self.queues_private = "private" in kinds
        self.queues_channels = bool(kinds & {"channel", "large"})
        self.stats = ArchiveStats()
        self.link: PgLink | None = None
        self.archive: Archive | None = None
        self._timer = None
        self.migrated = False
        self._migrating = False
        self._migration_failures = 0    # in a row (retried every tick while the link is up)
        self._busy = False              # a peek, a PostgreSQL batch or its confirmation in flight
        self._armed = False             # the gather timer is set
        self._again = False             # a message came while busy, after the peek was sent
        self._failing = False           # the last batch failed (logged once until one passes)
        self._lag_log = LagLog()

    # -- start and stop ---------------------------------------------------------------
    def start(self, reactor: Reactor) -> None:
        """Migrate (blocking, briefly), then open the link on ``reactor``. A newer
        schema than this code's raises SchemaTooNew: the server must not start."""
        failure = migrate_at_start(self.dsn)
        self.migrated = failure is None
        if failure is not None:
            log.warning("archive not migrated at start (%s); messages wait in SQLite until it is", failure)
        self.link = PgLink(reactor, self.dsn, on_state=self._on_state)
        self.archive = Archive(self.link)
        self._timer = reactor.timer(self._pump)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.close()
            self._timer = None
        if self.link is not None:
            self.link.close()

    def _on_state(self, state: str) -> None:
        up = state is UP
        self.stats.link_up = up
        if up:
            log.info("archive link up; %d messages wait to be archived", self.stats.pending)
            if not self.migrated:
                self._migrate()
            self.poke()
        else:
            log.warning("archive link down (%s); %d messages wait in SQLite", self.link.last_error,
                        self.stats.pending)

    def _migrate(self) -> None:
        if not self._migrating:
            self._migrating = True
            migrate_on_link(self.link).wait(_migrated, self, None)

    # -- the write-behind ---------------------------------------------------------------
    def poke(self) -> None:
        """A message of an archived kind went to the writer: archive it soon (while
        PostgreSQL cannot take it, the tick keeps the figures)."""
        if self._busy:
            self._again = True
        elif not self._armed and self._ready():
            self._armed = True
            self._timer.set(time.monotonic_ns() + GATHER_NS)

    def _ready(self) -> bool:
        return self.migrated and self.link is not None and self.link.state is UP

    def tick(self) -> None:
        """Once a second: refresh the figures (and retry after a failure), log a lag."""
        if self.link is None:
            return
        if not self.migrated and self.link.state is UP:
            self._migrate()
        if not self._busy:
            self._pump()
        self._lag_log.observe(self.stats, time.monotonic(), "messages wait", f"link {self.link.state}")

    def _pump(self) -> None:
        """Read the queue's oldest rows (none while PostgreSQL cannot take them: the
        figures only) and send them on."""
        self._armed = False
        if self._busy:
            return
        self._busy = True
        self._again = False             # this peek sees every message sent to the writer so far
        self.store._call(OP_ARCHIVE_PEEK, [self.batch if self._ready() else 0]).wait(_peeked, self, None)

    def _batch_of(self, rows: list) -> list[tuple]:
        """The rows of archived kinds, as ``Archive.archive_messages`` takes them."""
        batch = []
        kinds = {}
        for _, conv, _, message in rows:
            if message is None:
                continue                # gone from SQLite (its channel deleted): nothing to keep
            if conv[0] == "u":
                if self.queues_private:
                    low, high = conv[2:].split(":")
                    batch.append((USER, (int(low), int(high)), message))
                continue
            name = conv[2:]
            kind = kinds.get(name)
            if kind is None:
                kind = kinds[name] = self.channel_kind(name)
            if kind in self.kinds:
                batch.append((CHANNEL, name, message))
        return batch

    def channel_kind(self, channel: str) -> str:
        """``"large"`` or ``"channel"`` by the member count, as retention decides the tier."""
        large = self.store.meta.member_count(channel) >= self.store.retention.large_members
        return "large" if large else "channel"

    def archives(self, kind: HistoryKind, key: Union[ChannelKey, PairKey]) -> bool:
        """Whether this conversation's messages are archived (so its history may be read there)."""
        if kind == USER:
            return self.queues_private
        return self.queues_channels and self.channel_kind(key) in self.kinds

    def _confirm(self, upto: int) -> None:
        self.store._call(OP_ARCHIVE_DONE, [upto]).wait(_confirmed, self, None)

    # -- reads ---------------------------------------------------------------------
    def history(self, kind: HistoryKind, key: Union[ChannelKey, PairKey], before_seq: int | None,
                limit: int) -> Pending:
        """``Store.history`` for an archived conversation: SQLite's page, completed
        from PostgreSQL below what SQLite kept."""
        result = Pending()
        self.store._call(OP_HISTORY_SPAN, [kind, key, before_seq, limit]).wait(
            _spanned, self, (result, kind, key))
        return result


# -- what each answer becomes (module functions: no closure per call) ----------------------

def _migrated(archiver: SQLiteArchiver, _: None, ok: bool, value: Any) -> None:
    archiver._migrating = False
    if ok:
        archiver.migrated = True
        archiver._migration_failures = 0
        log.info("archive migrated (it had schema version %s)", value)
        archiver.poke()
        return
    archiver._migration_failures += 1
    if archiver._migration_failures % MIGRATION_LOG_EVERY == 1:     # the first, then once a minute
        log.warning("archive migration failed (%d times): %s; tried again every second while the link "
                    "is up", archiver._migration_failures, value)


def _peeked(archiver: SQLiteArchiver, _: None, ok: bool, value: Any) -> None:
    if not ok:
        archiver._busy = False
        return
    rows, pending, oldest_ms = value
    stats = archiver.stats
    stats.pending = pending
    stats.lag_seconds = max(0, wall_clock_ms() - oldest_ms) / 1000 if pending and oldest_ms else 0.0
    if not rows:
        archiver._busy = False
        if archiver._again:
            archiver.poke()
        return
    tombstone = next((index for index, row in enumerate(rows) if row[2] == 0), None)
    if tombstone == 0:
        # a deleted channel: PostgreSQL forgets it, after every message queued before
        # (archived by now) and before any of a channel made again under its name
        archiver.archive.forget_conversation(CHANNEL, rows[0][1][2:]).wait(_archived, archiver, rows[0][0])
        return
    if tombstone is not None:
        rows = rows[:tombstone]
    upto = rows[-1][0]
    batch = archiver._batch_of(rows)
    if batch:
        archiver.archive.archive_messages(batch).wait(_archived, archiver, upto)
    else:
        archiver._confirm(upto)


def _archived(archiver: SQLiteArchiver, upto: int, ok: bool, value: Any) -> None:
    stats = archiver.stats
    if not ok:
        stats.failures += 1
        archiver._busy = False          # queued still: the next tick tries again
        if not archiver._failing:
            archiver._failing = True
            log.warning("archive batch failed: %s; it stays queued in SQLite", value)
        return
    if archiver._failing:
        archiver._failing = False
        log.info("archive batches pass again")
    stats.messages += value or 0        # (a forgotten channel settles with None)
    archiver._confirm(upto)


def _confirmed(archiver: SQLiteArchiver, _: None, ok: bool, value: Any) -> None:
    archiver._busy = False
    if ok:
        archiver._pump()                # more may wait; an empty peek ends the run


def _spanned(archiver: SQLiteArchiver, asked: tuple, ok: bool, value: Any) -> None:
    result, kind, key = asked
    if not ok:
        result.settle(False, value)
        return
    messages, has_more, low, high = value
    # the run of seqs at the page's top that SQLite holds whole
    expected = high
    index = len(messages)
    while index and messages[index - 1].get("seq") == expected:
        index -= 1
        expected -= 1
    if expected < low:
        result.settle(True, (messages, has_more))
        return
    # expected + 1 .. high is whole; low .. expected was pruned: PostgreSQL has it
    archiver.stats.reads += 1
    archiver.archive.history(kind, key, expected + 1, expected + 1 - low).wait(
        _joined, result, messages[index:])


def _joined(result: Pending, top: list, ok: bool, value: Any) -> None:
    if not ok:
        result.settle(False, f"the archive cannot be read: {value}")
        return
    older, more = value
    result.settle(True, (older + top, more))
