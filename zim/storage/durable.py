"""The default Store: everything on disk (SQLite), written by a separate process.

``DurableStore`` is what handlers call in the process that runs them (the single
server process, or the router of ``--workers N``). It keeps users, channels and
memberships in memory (loaded at start; the same compact tables as MemoryStore),
so checks and logins read nothing from disk. Every change, every message and
every history or mailbox read is sent to the writer process (``zim.storage.writer``)
over a socketpair served by the reactor: the reactor never waits on the disk.

A call that goes to the writer returns a ``Pending`` that settles when the
writer has committed the batch holding it (group commit); the framework sends
the client's response then, so a response means "stored". Answers come in the
order of the calls. A change to the in-memory tables is made at once (later
requests see it) and undone if the writer reports that its batch failed.

Quotas (``set_quotas``, before ``attach``): the channels a user may create are
counted here, in memory (every channel and its creator are loaded at start), so
a subscribe past the limit settles at once with ``StoreRefusal``
(``too_many_channels``) and nothing goes to the writer; the creator is stored by
the writer with the channel. The mailbox quota is the writer's (it is atomic
with the batch): it gets the limits as arguments, and a refused direct message
is answered LIMIT, which settles its call with ``StoreRefusal`` (``mailbox_full``).

With ``--archive`` (``use_archive``), a ``zim.storage.archiver.SQLiteArchiver``
writes the messages of the archived kinds behind to PostgreSQL, and answers the
history of those conversations from SQLite and, below it, from PostgreSQL.
"""
from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import time
from collections import deque
from typing import Any, Callable, Iterable, Union

import orjson

from zim._core import Reactor
from zim.pending import Pending
from zim.process import Backoff, exit_reason, helper_command
from zim.storage.batchstats import BatchStats
from zim.storage.retention import Retention
from zim.storage.sqlite import SQLiteStore
from zim.storage.store import (
    ChannelKey, HistoryKind, MemoryStore, Message, PairKey, Quotas, StoreRefusal,
)
from zim.storage.writer import (
    FAILED, LIMIT, OP_ACK, OP_CHANNEL_MESSAGE, OP_CREATE_CHANNEL, OP_CREATE_USER, OP_DELETE_CHANNEL, OP_GRANT, OP_HISTORY,
    OP_MAILBOX, OP_RENAME, OP_RESYNC, OP_REVOKE_GRANT, OP_SUBSCRIBE, OP_TOKEN_EPOCH, OP_UNSUBSCRIBE,
    OP_USER_MESSAGE, REFUSED, writer_settings,
)

log = logging.getLogger("zim.storage")

DB_FILE = "zim.db"


def create_database_file(data_dir: str) -> None:
    """Make an empty ``zim.db`` (mode 0600, never through a symlink) if there is
    none, so that SQLite, which would create it 0644 less the umask, opens a
    private file; its ``-wal`` and ``-shm`` take the database's mode."""
    from zim.datadir import create_private_file

    path = os.path.join(data_dir, DB_FILE)
    try:
        os.close(create_private_file(path))
    except FileExistsError:
        pass
    except OSError as exc:
        raise RuntimeError(f"cannot create the zim database {path}: {exc}") from exc


# How to undo a call's in-memory change: a function and its arguments (a tuple
# rather than a closure: thousands of calls may be waiting during a login storm)
Undo = tuple


class StoreCall(Pending):
    """One call sent to the writer: its place in line, how to undo its in-memory
    part, and for a message append the caller's message (its seq is set once stored)."""

    __slots__ = ("number", "undo", "message")

    def __init__(self, number: int, undo: Undo | None) -> None:
        super().__init__()
        self.number = number
        self.undo = undo
        self.message: Message | None = None

    def settle(self, ok: bool, value: Any) -> None:
        if ok and self.message is not None:
            self.message["seq"] = value     # as MemoryStore does to the dict it keeps
        super().settle(ok, value)


class DurableStore:
    """A Store in ``DATA/zim.db``; see the module docstring.

    Opening it checks the database (a corrupt, unwritable or newer file raises
    RuntimeError) and loads users and memberships; ``attach(reactor)`` starts the
    writer process; ``close()`` stops it.
    """

    def __init__(self, data_dir: str, retention: Retention = Retention()) -> None:
        self.path = os.path.join(data_dir, DB_FILE)
        self.retention = retention
        self.meta = MemoryStore()               # users, channels (and creators), memberships
        self.quotas = Quotas()
        self.meta.set_quotas(_channel_quota(self.quotas))
        self.calls: deque[StoreCall] = deque()  # sent, not answered yet (oldest first)
        self.issued = 0                         # calls sent so far
        self.undone_upto = 0                    # calls up to this number were undone already
        self.backlog_limit = 0                  # calls waiting before on_backlog(True) (0: none)
        self.backlogged = False
        self.on_backlog: Callable[[bool], None] = lambda full: None
        self.reactor: Reactor | None = None
        self.link = 0
        self.on_link: Callable[[int], None] = lambda link: None
        self.process: subprocess.Popen | None = None
        self.started = 0.0                      # monotonic time of the writer's start
        self.backoff = Backoff()
        self.restart_at = 0.0                   # the writer failed at start: next try then (tick)
        self.restarts = 0                       # writers started after the first
        self.batch_stats, self._stats_fd = BatchStats.create()     # the writers' figures, kept across restarts
        self.closed = False
        self.stopping = False                   # the server is stopping: a writer that ends stays down
        self._tokens_v2_since = 0
        self.archiver = None                    # zim.storage.archiver.SQLiteArchiver (use_archive)
        self.archive_stats = None               # its figures, exported as metrics when set
        self._newest_id = self._load()

    def _load(self) -> int:
        db = SQLiteStore(self.path)
        try:
            meta = self.meta
            for user_id, name in db.all_users():
                meta.create_user(user_id, name)
            for channel, creator in db.all_channels_with_creators():
                meta.add_channel(channel, creator)
            for channel in db.all_private_channels():
                meta.add_channel(channel, private=True)
            for channel, user_id, can_invite in db.all_grants():
                meta.grant(channel, user_id, can_invite)
            for channel, user_id, push in db.all_members():
                meta.subscribe(channel, user_id, push)
            for user_id, epoch in db.all_token_epochs():
                meta.set_token_epoch(user_id, epoch)
            self._tokens_v2_since = db.tokens_v2_since()
            return db.newest_id()
        finally:
            db.close()

    def newest_id(self) -> int:
        """The greatest id stored when the database was opened."""
        return self._newest_id

    def tokens_v2_since(self) -> int:
        """When the database was upgraded to token version 2 (Unix ms; 0: made with it)."""
        return self._tokens_v2_since

    def set_quotas(self, quotas: Quotas) -> None:
        """The limits (zim.storage.store.Quotas): the channel quota is checked
        here, the mailbox's by the writer, which gets them at every start. Call
        before ``attach``; a writer already running keeps the ones it started with."""
        self.quotas = quotas
        self.meta.set_quotas(_channel_quota(quotas))

    def use_archive(self, dsn: str, kinds: frozenset[str], batch: int) -> None:
        """Keep the messages of ``kinds`` in PostgreSQL too (``--archive``:
        zim.storage.archiver). Call before ``attach``: the writer learns at its
        start which messages to queue for it."""
        from zim.storage.archiver import SQLiteArchiver     # here: the archive extra may not be installed

        self.archiver = SQLiteArchiver(self, dsn, kinds, batch)
        self.archive_stats = self.archiver.stats

    # -- the writer process ----------------------------------------------------
    def set_backlog(self, limit: int, on_backlog: Callable[[bool], None]) -> None:
        """Call ``on_backlog(True)`` once ``limit`` calls wait for the writer, and
        ``on_backlog(False)`` once no more than half of that wait: the caller stops
        taking requests meanwhile, so a burst waits where it costs a few bytes (the
        workers, the kernel) rather than as calls and undo records here. 0: no limit."""
        self.backlog_limit = limit
        self.on_backlog = on_backlog

    def _backlog_drained(self) -> None:
        if self.backlogged and len(self.calls) <= self.backlog_limit // 2:
            self.backlogged = False
            self.on_backlog(False)

    def attach(self, reactor: Reactor, on_link: Callable[[int], None]) -> None:
        """Start the writer; ``on_link(link)`` learns each new link (packets on it
        go to ``on_link_packet``, its closing to ``on_link_closed``)."""
        self.reactor = reactor
        self.on_link = on_link
        self._spawn()
        if self.archiver is not None:
            self.archiver.start(reactor)

    def _spawn(self) -> None:
        self.restart_at = 0.0
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        command = helper_command(
            "zim.storage.writer", "--db", self.path, "--link-fd", str(theirs.fileno()),
            "--parent", str(os.getpid()), "--stats-fd", str(self._stats_fd),
            "--link-max-packet", str(self.reactor.link_max_packet),
            "--log-level", logging.getLevelName(logging.getLogger().getEffectiveLevel()),
            "--settings", writer_settings(self.retention, self.quotas, *self._queued_kinds()))
        self.started = time.monotonic()
        try:
            self.process = subprocess.Popen(command, pass_fds=(theirs.fileno(), self._stats_fd))
        except OSError as exc:
            ours.close()
            self._restart_later(f"cannot start the writer process: {exc}")
            return
        finally:
            theirs.close()
        self.link = self.reactor.adopt_link(ours.detach())
        self.on_link(self.link)

    def _queued_kinds(self) -> tuple[bool, bool]:
        """Whether the writer queues direct and channel messages for the archive."""
        archiver = self.archiver
        return (False, False) if archiver is None else (archiver.queues_private, archiver.queues_channels)

    def _restart_later(self, why: str, at_least: float = 0.0) -> None:
        delay = max(at_least, self.backoff.after_exit(time.monotonic() - self.started))
        log.error("%s; restarting it%s", why, f" in {delay:g} s" if delay else "")
        if delay:
            self.restart_at = time.monotonic() + delay
        else:
            self._respawn()

    def _respawn(self) -> None:
        self.restarts += 1
        self._spawn()

    def tick(self) -> None:
        """Once a second: start the writer again once its back-off delay is over."""
        if self.restart_at and not self.closed and time.monotonic() >= self.restart_at:
            self._respawn()
        if self.archiver is not None and not self.closed:
            self.archiver.tick()

    @property
    def writer_up(self) -> bool:
        """The writer process is running and linked (writes can be stored)."""
        return bool(self.link) and self.process is not None and self.process.poll() is None

    def on_link_closed(self) -> None:
        """The writer died: what it had not answered fails (it may or may not be
        stored: the client gets ``internal`` and may retry); start a new one, at
        once if it had been running a while, else after a growing delay."""
        if self.closed:
            return
        code = None
        if self.process is not None:
            try:
                code = self.process.wait(0.2)   # its link closed: it is exiting
            except subprocess.TimeoutExpired:
                self.process.kill()
                code = self.process.wait()
        self.process = None
        self.link = 0
        self.on_link(0)
        calls = list(self.calls)
        self.calls.clear()
        self._undo(calls)
        self._backlog_drained()
        for call in calls:
            call.settle(False, "the writer process exited")
        if self.stopping:
            # SIGTERM reaches every process of the group (systemd's stop): nothing to restart
            log.info("the writer process ended (%s) as the server stops; %d store calls failed",
                     exit_reason(code), len(calls))
            return
        # a SIGTERM from outside may be the start of a stop: give it a moment before restarting
        stopped = code is not None and -code in (signal.SIGTERM, signal.SIGINT)
        self._restart_later(f"the writer process ended ({exit_reason(code)}); "
                            f"{len(calls)} store calls failed", at_least=1.0 if stopped else 0.0)

    def on_link_packet(self, op: int, status: int, payload: bytes) -> None:
        """The writer's answer to the oldest call."""
        if not self.calls:
            log.error("the writer answered a call never made (op %d)", op)
            return
        call = self.calls.popleft()
        self._backlog_drained()
        value = orjson.loads(payload) if payload else None
        if status == REFUSED:
            # this call alone was not done: the writer goes on with the others
            self._undo([call])
            call.settle(False, value)
        elif status == LIMIT:
            # refused by a quota (a full mailbox), nothing of it stored; the others go on
            self._undo([call])
            call.settle(False, _refusal(value))
        elif status == FAILED:
            if call.number > self.undone_upto:
                # this and every later call fail: undo them newest first, then let
                # the writer accept writes again
                self._undo([call, *self.calls])
                self.undone_upto = self.issued
                self.reactor.reply(self.link, OP_RESYNC, 0, b"[]")
            call.settle(False, value)
        else:
            call.settle(True, value)

    def _undo(self, calls: list[StoreCall]) -> None:
        for call in reversed(calls):
            if call.undo is not None:
                function, *args = call.undo
                function(*args)
                call.undo = None

    def _call(self, op: int, args: list, undo: Undo | None = None) -> StoreCall:
        self.issued += 1
        call = StoreCall(self.issued, undo)
        if self.link and self.reactor.reply(self.link, op, 0, orjson.dumps(args)):
            self.calls.append(call)
            if self.backlog_limit and not self.backlogged and len(self.calls) >= self.backlog_limit:
                self.backlogged = True
                self.on_backlog(True)
        else:
            self._undo([call])
            call.settle(False, "the writer process is not running")
        return call

    def close(self) -> None:
        self.closed = True
        if self.archiver is not None:
            self.archiver.close()
        process, self.process = self.process, None
        if self.link and self.reactor is not None:
            self.reactor.close(self.link)
        self.link = 0
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    # -- users -------------------------------------------------------------
    def create_user(self, user_id: int, name: str) -> Pending:
        meta = self.meta
        meta.create_user(user_id, name)
        return self._call(OP_CREATE_USER, [user_id, name], (MemoryStore.remove_user, meta, user_id))

    def user_exists(self, user_id: int) -> bool:
        return self.meta.user_exists(user_id)

    def user_name(self, user_id: int) -> str | None:
        return self.meta.user_name(user_id)

    def set_user_name(self, user_id: int, name: str) -> Pending:
        meta = self.meta
        old = meta.user_name(user_id)
        meta.set_user_name(user_id, name)
        return self._call(OP_RENAME, [user_id, name], (meta.set_user_name, user_id, old))

    def token_epoch(self, user_id: int) -> int:
        return self.meta.token_epoch(user_id)

    def revoke_tokens(self, user_id: int) -> Pending:
        """The new epoch counts at once (in memory: the next token login is refused
        even before the commit), and is undone if the write fails."""
        meta = self.meta
        old = meta.token_epoch(user_id)
        epoch = meta.revoke_tokens(user_id)
        call = self._call(OP_TOKEN_EPOCH, [user_id, epoch], (meta.set_token_epoch, user_id, old))
        return _with_value(call, epoch)

    # -- channels ----------------------------------------------------------
    def channel_exists(self, channel: str) -> bool:
        return self.meta.channel_exists(channel)

    def subscribe(self, channel: str, user_id: int, push: bool) -> Pending:
        """A subscribe that would create a channel past the user's quota settles
        at once with StoreRefusal (``too_many_channels``): nothing is stored."""
        meta = self.meta
        existed = meta.channel_exists(channel)
        old = meta.membership(channel, user_id)
        try:
            meta.subscribe(channel, user_id, push)    # a new channel counts for its creator
        except StoreRefusal as refusal:
            refused = Pending()
            refused.settle(False, refusal)
            return refused

        def undo() -> None:
            if old is not None:
                meta.subscribe(channel, user_id, old)
                return
            meta.unsubscribe(channel, user_id)
            if not existed:
                meta.drop_channel(channel)

        return self._call(OP_SUBSCRIBE, [channel, user_id, bool(push)], (undo,))

    # -- private channels (written like memberships: in memory at once, undone if the write fails) --
    def create_channel(self, channel: str, creator: int | None, private: bool) -> Pending | bool:
        """False at once if the channel exists; a creation past the creator's
        quota settles at once with StoreRefusal (``too_many_channels``)."""
        meta = self.meta
        try:
            if not meta.create_channel(channel, creator, private):
                return False
        except StoreRefusal as refusal:
            refused = Pending()
            refused.settle(False, refusal)
            return refused
        call = self._call(OP_CREATE_CHANNEL, [channel, creator, bool(private)], (meta.drop_channel, channel))
        return _with_value(call, True)

    def channel_private(self, channel: str) -> bool:
        return self.meta.channel_private(channel)

    def grant(self, channel: str, user_id: int, can_invite: bool) -> Pending:
        meta = self.meta
        old = meta.grant_of(channel, user_id)
        meta.grant(channel, user_id, can_invite)
        return self._call(OP_GRANT, [channel, user_id, bool(can_invite)], (meta.set_grant, channel, user_id, old))

    def revoke_grant(self, channel: str, user_id: int) -> Pending | bool:
        meta = self.meta
        old = meta.grant_of(channel, user_id)
        if old is None:
            return False
        meta.revoke_grant(channel, user_id)
        return _with_value(self._call(OP_REVOKE_GRANT, [channel, user_id], (meta.set_grant, channel, user_id, old)),
                           True)

    def grant_of(self, channel: str, user_id: int) -> bool | None:
        return self.meta.grant_of(channel, user_id)

    def unsubscribe(self, channel: str, user_id: int) -> Pending | bool:
        meta = self.meta
        old = meta.membership(channel, user_id)
        if not meta.unsubscribe(channel, user_id):
            return False
        return self._call(OP_UNSUBSCRIBE, [channel, user_id], (meta.subscribe, channel, user_id, old))

    def membership(self, channel: str, user_id: int) -> bool | None:
        return self.meta.membership(channel, user_id)

    def channel_members(self, channel: str) -> list[int]:
        return self.meta.channel_members(channel)

    def channel_count(self) -> int:
        return self.meta.channel_count()

    def delete_channel(self, channel: str) -> Pending | None:
        """A Pending of the members' ids once deleted; None for no such channel."""
        meta = self.meta
        if not meta.channel_exists(channel):
            return None
        memberships = [(user_id, meta.membership(channel, user_id)) for user_id in meta.channel_members(channel)]
        creator = meta.creator_of(channel)
        private = meta.channel_private(channel)
        grants = meta.channel_grants(channel)
        members = meta.delete_channel(channel)

        def undo() -> None:
            meta.add_channel(channel, creator, private)
            for user_id, push in memberships:
                meta.subscribe(channel, user_id, push)
            for user_id, can_invite in grants.items():
                meta.set_grant(channel, user_id, can_invite)

        return _with_value(self._call(OP_DELETE_CHANNEL, [channel], (undo,)), members)

    def user_channels(self, user_id: int) -> list[tuple[str, bool]]:
        return self.meta.user_channels(user_id)

    # -- messages (seq is set by the writer, in the batch's transaction) --------
    def append_channel_message(self, channel: str, msg: Message) -> Pending:
        call = self._call(OP_CHANNEL_MESSAGE, [channel, msg])
        call.message = msg
        if self.archiver is not None and self.archiver.queues_channels:
            self.archiver.poke()
        return call

    def append_user_message(self, sender_id: int, receiver_id: int, msg: Message) -> Pending:
        call = self._call(OP_USER_MESSAGE, [sender_id, receiver_id, msg])
        call.message = msg
        if self.archiver is not None and self.archiver.queues_private:
            self.archiver.poke()
        return call

    def history(self, kind: HistoryKind, key: Union[ChannelKey, PairKey],
                before_seq: int | None, limit: int) -> Pending:
        """With the archive, a conversation it keeps is read from SQLite and,
        below what SQLite kept, from PostgreSQL (zim.storage.archiver)."""
        if self.archiver is not None and self.archiver.archives(kind, key):
            return self.archiver.history(kind, key, before_seq, limit)
        return self._call(OP_HISTORY, [kind, key, before_seq, limit])

    # -- mailboxes ---------------------------------------------------------
    def mailbox_pull(self, user_id: int, limit: int) -> Pending:
        return self._call(OP_MAILBOX, [user_id, limit])

    def mailbox_ack(self, user_id: int, ids: Iterable[str]) -> Pending:
        return self._call(OP_ACK, [user_id, [i for i in ids if isinstance(i, str)]])


def _channel_quota(quotas: Quotas) -> Quotas:
    """What the in-memory tables enforce: the channel quota (they hold no mailbox)."""
    return Quotas(0, 0, quotas.max_channels_per_user)


def _refusal(value: Any) -> StoreRefusal:
    """The StoreRefusal of a LIMIT answer's body ({"code", "message"})."""
    if isinstance(value, dict):
        return StoreRefusal(str(value.get("code")), str(value.get("message")))
    return StoreRefusal("internal", str(value))


def _with_value(pending: Pending, value: Any) -> Pending:
    """A Pending that settles as ``pending`` does, but with ``value`` on success."""
    result = Pending()
    pending.wait(_settle_with, result, value)
    return result


def _settle_with(result: Pending, value: Any, ok: bool, reason: Any) -> None:
    result.settle(ok, value if ok else reason)
