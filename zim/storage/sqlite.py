"""A durable ``Store`` on the standard library's sqlite3 (one database file).

``SQLiteStore(path)`` implements the ``zim.storage.store.Store`` protocol with the same
semantics as ``MemoryStore``; every write method commits its own transaction
before it returns, so a successful call is stored.

Where things are:

- ``zim.storage.sqlite_schema``: the database file: durability, settings, the
  schema and the upgrades from older versions (``open_database``);
- ``zim.storage.sqlite_writes``: how ids and conversations are stored, and the
  writes: ``write_<what>(cursor, ...)`` functions that do not commit, pruning
  included;
- here: the store itself: its batches (group commit), the caches that make a
  batch's appends cheap, and the reads.

``_transaction`` runs one write in its own BEGIN IMMEDIATE ... COMMIT (or in the open batch).
Message appends are buffered (``begin_batch``): outside a batch, each runs in a
batch of its own.

Quotas (``set_quotas``): a direct message to a mailbox that is full raises
``StoreRefusal`` before anything is queued or any seq taken; the batch goes on.

Like MemoryStore, one instance is meant to be used by one thread at a time.
Differences from MemoryStore: messages come back as new dicts equal to the stored
ones (not the same objects, so mutating one changes nothing stored), a message
must be JSON-encodable by orjson (str keys, ints within 64 bits), and history and
mailbox pages are bounded by bytes as well as by count (``PAGE_BYTES``).
"""
from __future__ import annotations

import sqlite3
from typing import Any, Callable, Iterable, Iterator, Union

import orjson

from zim.storage.retention import Retention
from zim.storage.sqlite_schema import SCHEMA_VERSION, open_database
from zim.storage.sqlite_writes import (
    MAILBOX_INSERT, SQL_INT_MAX, channel_conv, check_user_id, pair_conv, sql_id, write_create_channel,
    write_create_user, write_delete_channel, write_grant, write_mailbox_ack, write_prune, write_revoke_grant, write_set_user_name,
    write_subscribe, write_token_epoch, write_unsubscribe,
)
from zim.storage.store import (CHANNEL, MAX_USER_ID, USER, ChannelKey, HistoryKind, Message, PairKey,
                               Quotas, _encode_name)

__all__ = ["PAGE_BYTES", "PAGE_OVERHEAD", "SCHEMA_VERSION", "SQLiteStore"]

# History and mailbox pages are bounded by bytes here, at the source, so that no
# answer of the writer is a monster (70 DMs of 64 KB made a 4.5 MB one). A page
# stops once its messages have passed PAGE_BYTES and it holds two of them: at most
# PAGE_BYTES and two messages. zim.im trims it to its budget (the same figure,
# measured the same way) and whatever it trims tells it there is more (hasMore),
# even when the first message alone is over the budget.
PAGE_BYTES = 1_000_000              # = zim.im.RESPONSE_BUDGET
PAGE_OVERHEAD = 64                  # = zim.im._PAGE_OVERHEAD: {"messages":[...],"hasMore":false}
SEQ_CACHE_MAX = 100_000       # conversations whose last seq the writer remembers between batches


def _write_delete_archived_channel(cur: sqlite3.Cursor, channel: str) -> list[int] | None:
    members = write_delete_channel(cur, channel)
    if members is not None:
        cur.execute("INSERT INTO archive_queue(conv, seq) VALUES (?, 0)", (channel_conv(channel),))
    return members


def _write_archive_done(cur: sqlite3.Cursor, upto: int) -> None:
    cur.execute("DELETE FROM archive_queue WHERE pos <= ?", (upto,))


def _bounded_page(cursor: sqlite3.Cursor) -> tuple[list[Message], bool]:
    """The messages of a query of bodies, in its order, until they have passed
    PAGE_BYTES with two of them at least; True if rows were left (the rest of
    the query is not read)."""
    messages: list[Message] = []
    total = PAGE_OVERHEAD
    try:
        for (body,) in cursor:
            if total > PAGE_BYTES and len(messages) >= 2:
                return messages, True
            messages.append(orjson.loads(body))
            total += len(body) + 1
        return messages, False
    finally:
        cursor.close()


# ---------------------------------------------------------------- the store


class SQLiteStore:
    """A Store kept in the SQLite database at ``path`` (created if missing)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._conn: sqlite3.Connection | None = None
        self._batch: sqlite3.Cursor | None = None
        self._message_rows: list[tuple] = []
        self._mailbox_rows: list[tuple] = []
        self._last_seq: dict[str, int] = {}     # conv -> last seq (see _peek_seq)
        self._dirty: dict[str, int] = {}        # conv -> last seq not written yet
        self._boxes: dict[int | None, list[int] | None] = {}  # user (SQL id) -> [mailbox count, bytes]
        self._boxes_dirty: set[int | None] = set()      # ... not written yet
        self.quotas = Quotas()
        self._newest_id = 0             # the greatest id seen (stored, or being stored)
        self._stored_newest_id = 0      # meta.newest_id as committed
        self._queue_private = False     # queue direct messages for the archive (set_archiving)
        self._queue_channels = False    # ... and channel messages
        self._archive_rows: list[tuple[str, int]] = []      # (conv, seq) for archive_queue
        try:
            conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            raise RuntimeError(f"cannot open the zim database {path!r}: {exc}") from exc
        try:
            self._newest_id = self._stored_newest_id = open_database(conn, path)
        except sqlite3.DatabaseError as exc:
            conn.close()
            raise RuntimeError(f"cannot use the zim database {path!r} "
                               f"(corrupt, not a database, or not writable): {exc}") from exc
        except BaseException:
            conn.close()
            raise
        self._conn = conn

    def set_quotas(self, quotas: Quotas) -> None:
        """The limits to enforce from now on. This store enforces the mailbox's
        (``append_user_message`` raises StoreRefusal); it records each channel's
        creator, but the count of channels a user created is checked by the
        server's store, which has every channel in memory (zim.storage.durable)."""
        self.quotas = quotas

    def set_archiving(self, private: bool, channels: bool) -> None:
        """From now on, queue the direct (``private``) and channel (``channels``)
        messages stored for the archive (``archive_queue``), and let pruning keep
        every message still queued. Both off: nothing is queued, and pruning
        ignores the queue (what it still names is skipped once archiving is back)."""
        self._queue_private = private
        self._queue_channels = channels

    @property
    def archiving(self) -> bool:
        return self._queue_private or self._queue_channels

    def _transaction(self, write: Callable[..., Any], *args: Any) -> Any:
        """Run one ``write_*`` function in its own transaction, committed on
        return; inside a batch (``begin_batch``), in the batch's transaction."""
        if self._batch is not None:
            if self._message_rows:
                self._flush()
            return write(self._batch, *args)
        self.begin_batch()
        try:
            result = write(self._batch, *args)
        except BaseException:
            self.rollback_batch()
            raise
        self.commit_batch()
        return result

    # -- batches (group commit) ---------------------------------------------
    def begin_batch(self) -> None:
        """Start a transaction that every following call joins until ``commit_batch``:
        many writes, one commit. Reads inside it see the batch's own writes."""
        if self._batch is not None:
            raise RuntimeError("a batch is open already")
        cur = self._connection().cursor()
        cur.execute("BEGIN IMMEDIATE")
        self._batch = cur

    def commit_batch(self) -> None:
        """Commit the batch; on an error it is rolled back and the error raised."""
        cur = self._batch
        if cur is None:
            raise RuntimeError("no batch is open")
        try:
            self._flush()
            newest = self._newest_id
            if newest > self._stored_newest_id:
                cur.execute("INSERT INTO meta(key, value) VALUES ('newest_id', ?) "
                            "ON CONFLICT(key) DO UPDATE SET value = max(value, excluded.value)",
                            (newest,))
            cur.execute("COMMIT")
            self._stored_newest_id = newest
        except BaseException:
            self.rollback_batch()
            raise
        self._batch = None
        if len(self._last_seq) > SEQ_CACHE_MAX:
            self._last_seq.clear()
        if len(self._boxes) > SEQ_CACHE_MAX:
            self._boxes.clear()

    # Inside a batch, messages are not inserted one statement at a time: their
    # rows wait in lists and go in with one executemany each (and the
    # conversations' last_seq with one more) when the batch commits or before
    # anything else reads or writes. seq comes from ``_last_seq``, a cache of
    # conversations.last_seq that is exact because this connection is the only writer.
    # A mailbox's count and bytes come the same way from ``_boxes``, a cache of
    # users.mailbox_count and mailbox_bytes (written at the same points as seq).
    def _peek_seq(self, conv: str, channel: str | None) -> int:
        """The seq the conversation's next message gets (taken by ``_buffer_message``)."""
        seq = self._last_seq.get(conv)
        if seq is None:
            cur = self._batch
            if channel is not None and cur.execute("SELECT 1 FROM channels WHERE name = ?",
                                                   (channel,)).fetchone() is None:
                raise KeyError(f"no channel {channel!r}")
            row = cur.execute("SELECT last_seq FROM conversations WHERE conv = ?", (conv,)).fetchone()
            seq = self._last_seq[conv] = row[0] if row else 0
        return seq + 1

    def _buffer_message(self, conv: str, msg: Message, seq: int, body: bytes | None = None) -> None:
        """Queue the message's row under ``seq`` (from ``_peek_seq``); ``body``:
        the message's JSON with that seq, if made already."""
        if body is None:
            msg["seq"] = seq
            body = orjson.dumps(msg)
        created_at = msg.get("createdAt")
        if type(created_at) is not int or not -SQL_INT_MAX <= created_at <= SQL_INT_MAX:
            created_at = None
        self._message_rows.append((conv, seq, str(msg.get("id")), body, created_at))
        if self._queue_channels if conv[0] == "c" else self._queue_private:
            self._archive_rows.append((conv, seq))
        self._last_seq[conv] = seq
        self._dirty[conv] = seq

    def _box_usage(self, uid: int | None) -> list[int] | None:
        """[messages, bytes] in the mailbox of the user with this SQL id (cached);
        None for a user not in ``users`` (the server never sends to one), whose
        mailbox is not counted."""
        try:
            return self._boxes[uid]
        except KeyError:
            row = self._batch.execute("SELECT mailbox_count, mailbox_bytes FROM users WHERE id = ?",
                                      (uid,)).fetchone()
            usage = self._boxes[uid] = [row[0], row[1]] if row else None
            return usage

    def _append_channel(self, channel: str, msg: Message) -> int:
        conv = channel_conv(channel)
        seq = self._peek_seq(conv, channel)
        self._buffer_message(conv, msg, seq)
        return seq

    def _append_user(self, sender_id: int, receiver_id: int, msg: Message) -> int:
        conv = pair_conv((sender_id, receiver_id))
        uid = sql_id(receiver_id)
        message_id = msg["id"]
        seq = self._peek_seq(conv, None)
        old_seq = msg.get("seq")
        msg["seq"] = seq
        body = orjson.dumps(msg)
        size = len(body)                # as stored, seq included (Quotas)
        usage = self._boxes.get(uid, False)
        if usage is False:
            usage = self._box_usage(uid)
        if usage is not None:
            quotas = self.quotas
            if (quotas.max_mailbox and usage[0] >= quotas.max_mailbox) or \
                    (quotas.max_mailbox_bytes and usage[1] + size > quotas.max_mailbox_bytes):
                msg["seq"] = old_seq
                raise quotas.mailbox_refusal(usage[0], usage[1], size)   # nothing queued, no seq taken
            # an id already in the mailbox keeps its place and points at the new
            # message (the server never sends one twice: ids are unique); it is counted again
            usage[0] += 1
            usage[1] += size
            self._boxes_dirty.add(uid)
        self._buffer_message(conv, msg, seq, body)
        self._mailbox_rows.append((uid, message_id, conv, seq, size))
        return seq

    def _in_batch(self, append: Callable[..., Any], *args: Any) -> Any:
        """``append(*args)`` in the open batch, or in one of its own."""
        if self._batch is not None:
            return append(*args)
        self.begin_batch()
        try:
            result = append(*args)
        except BaseException:
            self.rollback_batch()
            raise
        self.commit_batch()
        return result

    def _flush(self) -> None:
        cur = self._batch
        if self._message_rows:
            cur.executemany("INSERT INTO messages(conv, seq, id, body, created_at) VALUES (?, ?, ?, ?, ?)",
                            self._message_rows)
            self._message_rows.clear()
        if self._archive_rows:
            cur.executemany("INSERT INTO archive_queue(conv, seq) VALUES (?, ?)", self._archive_rows)
            self._archive_rows.clear()
        if self._mailbox_rows:
            cur.executemany(MAILBOX_INSERT, self._mailbox_rows)
            self._mailbox_rows.clear()
        if self._dirty:
            cur.executemany("INSERT INTO conversations(conv, last_seq) VALUES (?, ?) "
                            "ON CONFLICT(conv) DO UPDATE SET last_seq = excluded.last_seq",
                            self._dirty.items())
            self._dirty.clear()
        if self._boxes_dirty:
            boxes = self._boxes
            cur.executemany("UPDATE users SET mailbox_count = ?, mailbox_bytes = ? WHERE id = ?",
                            [(*boxes[uid], uid) for uid in self._boxes_dirty])
            self._boxes_dirty.clear()

    def rollback_batch(self) -> None:
        """Undo everything since ``begin_batch``."""
        self._batch = None      # (_newest_id may stay ahead: it only ever moves id generators on)
        self._message_rows.clear()
        self._archive_rows.clear()
        self._mailbox_rows.clear()
        self._last_seq.clear()
        self._dirty.clear()
        self._boxes.clear()
        self._boxes_dirty.clear()
        conn = self._connection()
        if conn.in_transaction:
            conn.execute("ROLLBACK")

    def checkpoint_automatically(self, on: bool) -> None:
        """Off: commits never copy the WAL into the database; someone else must run
        ``PRAGMA wal_checkpoint`` (zim.storage.writer's Checkpointer thread does)."""
        conn = self._connection()
        conn.execute(f"PRAGMA wal_autocheckpoint = {1000 if on else 0}")
        # a WAL that grew under a burst is cut back to this size when it starts over
        conn.execute(f"PRAGMA journal_size_limit = {64 * 1024 * 1024}")

    def checkpoint(self) -> bool:
        """Copy the WAL into the database now (PASSIVE: never waits on a lock);
        True if all of it was copied, so the next transaction starts the WAL over."""
        busy, frames, copied = self._connection().execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        return not busy and frames == copied

    def newest_id(self) -> int:
        """The greatest user or message id stored (0: none)."""
        return self._newest_id

    def _note_id(self, message: Message) -> None:
        message_id = message.get("id")
        if isinstance(message_id, str) and message_id.isdigit() and len(message_id) < 20:
            value = int(message_id)
            if self._newest_id < value <= SQL_INT_MAX:
                self._newest_id = value

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise RuntimeError(f"the zim database {self.path!r} is closed")
        if self._message_rows:
            self._flush()           # reads see the batch's messages
        return self._conn

    def _one(self, sql: str, params: tuple) -> Any:
        return self._connection().execute(sql, params).fetchone()

    # -- users -------------------------------------------------------------
    def create_user(self, user_id: int, name: str) -> None:
        check_user_id(user_id)
        _encode_name(name)
        self._transaction(write_create_user, user_id, name)

    def user_exists(self, user_id: int) -> bool:
        if not isinstance(user_id, int) or not 0 < user_id <= MAX_USER_ID:
            return False
        return self._one("SELECT 1 FROM users WHERE id = ?", (sql_id(user_id),)) is not None

    def user_name(self, user_id: int) -> str | None:
        if not isinstance(user_id, int) or not 0 < user_id <= MAX_USER_ID:
            return None
        row = self._one("SELECT name FROM users WHERE id = ?", (sql_id(user_id),))
        return None if row is None else row[0]

    def set_user_name(self, user_id: int, name: str) -> None:
        if not isinstance(user_id, int) or not 0 < user_id <= MAX_USER_ID:
            raise KeyError(f"no user {user_id}")
        _encode_name(name)
        self._transaction(write_set_user_name, user_id, name)

    def token_epoch(self, user_id: int) -> int:
        """The user's token generation (0 for an unknown user)."""
        if not isinstance(user_id, int) or not 0 < user_id <= MAX_USER_ID:
            return 0
        row = self._one("SELECT token_epoch FROM users WHERE id = ?", (sql_id(user_id),))
        return 0 if row is None else row[0]

    def set_token_epoch(self, user_id: int, epoch: int) -> None:
        """Raise the user's token generation to ``epoch`` (never lowers it);
        KeyError for an unknown user."""
        if not isinstance(user_id, int) or not 0 < user_id <= MAX_USER_ID:
            raise KeyError(f"no user {user_id}")
        if isinstance(epoch, bool) or not isinstance(epoch, int) or not 0 <= epoch <= SQL_INT_MAX:
            raise ValueError(f"bad token epoch {epoch!r}")
        self._transaction(write_token_epoch, user_id, epoch)

    def revoke_tokens(self, user_id: int) -> int:
        """Bump the user's token generation; the new one. (The server's store bumps
        it in memory and writes it with ``set_token_epoch``.)"""
        epoch = self.token_epoch(user_id) + 1
        self.set_token_epoch(user_id, epoch)
        return epoch

    # -- channels ----------------------------------------------------------
    def channel_exists(self, channel: str) -> bool:
        return self._one("SELECT 1 FROM channels WHERE name = ?", (channel,)) is not None

    def subscribe(self, channel: str, user_id: int, push: bool) -> None:
        self._transaction(write_subscribe, channel, user_id, push)

    def unsubscribe(self, channel: str, user_id: int) -> bool:
        return self._transaction(write_unsubscribe, channel, user_id)

    def delete_channel(self, channel: str) -> list[int] | None:
        """With channels archived, a tombstone (seq 0) in ``archive_queue`` tells the
        archive to forget the channel's messages too, in their order with the others."""
        write = _write_delete_archived_channel if self._queue_channels else write_delete_channel
        members = self._transaction(write, channel)     # buffered messages go in first
        self._last_seq.pop(channel_conv(channel), None)                # a new channel of that name: seq 1
        return members

    def membership(self, channel: str, user_id: int) -> bool | None:
        row = self._one("SELECT push FROM members WHERE channel = ? AND user_id = ?",
                        (channel, sql_id(user_id)))
        return None if row is None else bool(row[0])

    def user_channels(self, user_id: int) -> list[tuple[str, bool]]:
        rows = self._connection().execute(
            "SELECT channel, push FROM members INDEXED BY members_by_user "
            "WHERE user_id = ? ORDER BY rowid", (sql_id(user_id),)).fetchall()
        return [(channel, bool(push)) for channel, push in rows]

    # -- private channels --------------------------------------------------
    def create_channel(self, channel: str, creator: int | None, private: bool) -> bool:
        """See zim.storage.store.Store (the server counts the creator's quota)."""
        if creator is not None:
            check_user_id(creator)
        return self._transaction(write_create_channel, channel, creator, private)

    def channel_private(self, channel: str) -> bool:
        row = self._one("SELECT private FROM channels WHERE name = ?", (channel,))
        return bool(row and row[0])

    def grant(self, channel: str, user_id: int, can_invite: bool) -> None:
        check_user_id(user_id)
        if not self.channel_exists(channel):
            raise KeyError(f"no channel {channel!r}")
        self._transaction(write_grant, channel, user_id, can_invite)

    def revoke_grant(self, channel: str, user_id: int) -> bool:
        return self._transaction(write_revoke_grant, channel, user_id)

    def grant_of(self, channel: str, user_id: int) -> bool | None:
        row = self._one("SELECT can_invite FROM grants WHERE channel = ? AND user_id = ?",
                        (channel, sql_id(user_id)))
        return None if row is None else bool(row[0])

    def all_private_channels(self) -> Iterator[str]:
        for (name,) in self._connection().execute("SELECT name FROM channels WHERE private != 0"):
            yield name

    def all_grants(self) -> Iterator[tuple[str, int, bool]]:
        """Every (channel, user id, can invite)."""
        for channel, user_id, can_invite in self._connection().execute(
                "SELECT channel, user_id, can_invite FROM grants"):
            yield channel, (user_id + (1 << 64) if user_id < 0 else user_id), bool(can_invite)

    # -- messages ----------------------------------------------------------
    def append_channel_message(self, channel: str, msg: Message) -> int:
        self._note_id(msg)     # before: the batch's commit records it
        if self._batch is not None:
            return self._append_channel(channel, msg)
        return self._in_batch(self._append_channel, channel, msg)

    def append_user_message(self, sender_id: int, receiver_id: int, msg: Message) -> int:
        """Refused (StoreRefusal ``mailbox_full``: nothing stored, no seq taken)
        when the receiver's mailbox is full (``Quotas``)."""
        self._note_id(msg)
        if self._batch is not None:     # (the writer's case: no detour)
            return self._append_user(sender_id, receiver_id, msg)
        return self._in_batch(self._append_user, sender_id, receiver_id, msg)

    def history(self, kind: HistoryKind, key: Union[ChannelKey, PairKey],
                before_seq: int | None, limit: int) -> tuple[list[Message], bool]:
        messages, has_more, _, _ = self.history_span(kind, key, before_seq, limit)
        return messages, has_more

    def history_span(self, kind: HistoryKind, key: Union[ChannelKey, PairKey],
                     before_seq: int | None, limit: int) -> tuple[list[Message], bool, int, int]:
        """``history``'s page, and the seqs it stands for (lowest, highest): the
        page holds every message kept in that range, so seqs missing in there were
        pruned (the archive has them: zim.storage.archiver); a page cut by
        PAGE_BYTES stands only for what it holds."""
        if kind == CHANNEL:
            conv = channel_conv(key)  # type: ignore[arg-type]
        elif kind == USER:
            conv = pair_conv(key)  # type: ignore[arg-type]
        else:
            raise ValueError(f"unknown history kind {kind!r}")
        row = self._one("SELECT last_seq FROM conversations WHERE conv = ?", (conv,))
        last_seq = 0 if row is None else row[0]
        # the same arithmetic as zim.storage.store.page: seq n sits at index n - 1
        end = last_seq if before_seq is None else max(0, min(last_seq, before_seq - 1))
        start = max(0, end - max(limit, 0))
        if end <= start:
            return [], start > 0, start + 1, end
        # the newest first, as far as PAGE_BYTES goes; then oldest first
        messages, cut = _bounded_page(self._connection().execute(
            "SELECT body FROM messages WHERE conv = ? AND seq > ? AND seq <= ? ORDER BY seq DESC",
            (conv, start, end)))
        messages.reverse()
        return messages, start > 0 or cut, messages[0]["seq"] if cut else start + 1, end

    # -- mailboxes ---------------------------------------------------------
    def mailbox_pull(self, user_id: int, limit: int) -> list[Message]:
        """The oldest ``limit`` messages, as far as PAGE_BYTES goes (see there)."""
        if limit < 1:
            return []
        return _bounded_page(self._connection().execute(
            "SELECT m.body FROM mailbox AS b INDEXED BY mailbox_by_user "
            "JOIN messages AS m ON m.conv = b.conv AND m.seq = b.seq "
            "WHERE b.user_id = ? ORDER BY b.rowid LIMIT ?",
            (sql_id(user_id), min(limit, SQL_INT_MAX))))[0]

    def mailbox_ack(self, user_id: int, ids: Iterable[str]) -> None:
        # only strings can be mailbox keys (MemoryStore: dict keys are the str ids)
        wanted = [message_id for message_id in ids if isinstance(message_id, str)]
        if wanted:
            self._transaction(self._write_ack, user_id, wanted)

    def _write_ack(self, cur: sqlite3.Cursor, user_id: int, ids: list[str]) -> None:
        rows, size = write_mailbox_ack(cur, user_id, ids)
        if rows:
            uid = sql_id(user_id)
            usage = self._box_usage(uid)
            if usage is not None:
                usage[0] = max(0, usage[0] - rows)
                usage[1] = max(0, usage[1] - size)
                self._boxes_dirty.add(uid)

    def mailbox_usage(self, user_id: int) -> tuple[int, int]:
        """(messages, bytes) waiting in the user's mailbox, as counted for the quota."""
        uid = sql_id(user_id)
        usage = self._boxes.get(uid)
        if usage is None:           # (not cached, or not a user: 0)
            row = self._one("SELECT mailbox_count, mailbox_bytes FROM users WHERE id = ?", (uid,))
            return (row[0], row[1]) if row else (0, 0)
        return usage[0], usage[1]

    # -- loading (a server keeps users and memberships in memory) ------------
    def all_users(self) -> Iterator[tuple[int, str]]:
        """Every (user id, name), by id."""
        for user_id, name in self._connection().execute("SELECT id, name FROM users ORDER BY id"):
            yield (user_id + (1 << 64) if user_id < 0 else user_id), name

    def all_token_epochs(self) -> Iterator[tuple[int, int]]:
        """Every (user id, token epoch) whose epoch is not 0 (few: users who logged out everywhere)."""
        for user_id, epoch in self._connection().execute(
                "SELECT id, token_epoch FROM users WHERE token_epoch != 0"):
            yield (user_id + (1 << 64) if user_id < 0 else user_id), epoch

    def tokens_v2_since(self) -> int:
        """When this database was upgraded to token version 2 (Unix ms), or 0 if it
        was made with version 2 (no version 1 token can name its users)."""
        row = self._one("SELECT value FROM meta WHERE key = 'tokens_v2_since'", ())
        return 0 if row is None else row[0]

    def all_channels(self) -> Iterator[str]:
        for (name,) in self._connection().execute("SELECT name FROM channels"):
            yield name

    def all_channels_with_creators(self) -> Iterator[tuple[str, int | None]]:
        """Every (channel, the user who created it); None for a channel created
        before creators were recorded (schema version 4)."""
        for name, creator in self._connection().execute("SELECT name, creator FROM channels"):
            yield name, (creator + (1 << 64) if creator is not None and creator < 0 else creator)

    def all_members(self) -> Iterator[tuple[str, int, bool]]:
        """Every (channel, user id, push), in the order joined."""
        for channel, user_id, push in self._connection().execute(
                "SELECT channel, user_id, push FROM members ORDER BY rowid"):
            yield channel, (user_id + (1 << 64) if user_id < 0 else user_id), bool(push)

    # -- retention -------------------------------------------------------
    def prune(self, retention: Retention, now_ms: int, after: str = "",
              row_budget: int = 2000) -> tuple[int, str | None]:
        """Delete messages outside the retention tiers, conversation by conversation
        in key order from the one after ``after``, until about ``row_budget`` rows
        are gone (a bounded step, so writes are not held up for long). Returns the
        rows deleted and where to go on (None: the pass is complete). A direct
        message still in its receiver's mailbox is kept. ``last_seq`` is never
        touched, so seq goes on from where it was even when everything was pruned."""
        return self._transaction(write_prune, retention, now_ms, after, row_budget, self.archiving)

    # -- the archive's queue (zim.storage.archiver) ------------------------------
    def archive_peek(self, limit: int) -> list:
        """The queue's ``limit`` oldest rows (fewer once their messages pass
        PAGE_BYTES) as ``[pos, conv, seq, message or None]`` (None: the message
        is gone, deleted with its channel or pruned while archiving was off; seq
        0: the channel was deleted, ``delete_channel``), then how many rows wait and the ``created_at`` (Unix
        ms) of the oldest message waiting (0: none)."""
        conn = self._connection()
        rows: list[list] = []
        total = 0
        cursor = conn.execute("SELECT q.pos, q.conv, q.seq, m.body FROM archive_queue AS q LEFT JOIN messages AS m "
                              "ON m.conv = q.conv AND m.seq = q.seq ORDER BY q.pos LIMIT ?", (max(0, limit),))
        for pos, conv, seq, body in cursor:
            if body is not None:
                if total > PAGE_BYTES and rows:
                    break           # the answer stays far below the link's packet limit
                total += len(body)
            rows.append([pos, conv, seq, None if body is None else orjson.loads(body)])
        cursor.close()
        low, high = conn.execute("SELECT min(pos), max(pos) FROM archive_queue").fetchone()
        oldest = 0
        if low is not None:
            found = conn.execute(
                "SELECT m.created_at FROM archive_queue AS q JOIN messages AS m "
                "ON m.conv = q.conv AND m.seq = q.seq ORDER BY q.pos LIMIT 1").fetchone()
            oldest = (found[0] or 0) if found else 0
        # rows leave only from the low end, and pos only grows: the queue is low..high whole
        return [rows, 0 if low is None else high - low + 1, oldest]

    def archive_done(self, upto: int) -> None:
        """The archive has committed every queued message up to ``pos`` ``upto``."""
        self._transaction(_write_archive_done, upto)

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.execute("PRAGMA optimize")
            except sqlite3.Error:
                pass
            conn.close()
