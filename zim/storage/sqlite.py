"""A durable ``Store`` on the standard library's sqlite3 (one database file).

``SQLiteStore(path)`` implements the ``zim.storage.store.Store`` protocol with the same
semantics as ``MemoryStore``; every write method commits its own transaction
before it returns, so a successful call is stored.

Durability. The database runs in WAL mode with ``synchronous=NORMAL``: a commit
appends its frames to the ``-wal`` file with a ``write()`` but does not fsync it
(the WAL is fsynced at checkpoints). So a committed write survives the process
being killed (``kill -9``, a crash): the frames are in the OS page cache and the
next open replays them. A power loss or kernel crash may lose the last commits
(never corrupt the database); ``PRAGMA synchronous=FULL`` (fsync on every commit)
is the setting that survives that too, at the cost of one fsync per write.

Other settings: foreign keys off (the tables refer to each other only by
convention), a ``busy_timeout`` so a second connection waits for a lock instead
of failing at once, and the schema version in ``PRAGMA user_version``: a
database written by a newer zim (a higher version) is refused with a
RuntimeError; so is a file that is not a database, is corrupt, or cannot be
opened for writing.

Schema (version 4; the versions' changes are applied in ``_open``):

- ``users(id, name)``: ids are unsigned 64-bit; SQLite integers are signed, so an
  id >= 2**63 is stored as ``id - 2**64`` (two's complement), here and in
  ``members``, ``mailbox`` and ``channels.creator``.
  Version 3 adds ``token_epoch`` (the user's token generation, zim.tokens).
  Version 4 adds ``mailbox_count`` and ``mailbox_bytes``: what waits in the
  user's mailbox, for its quota (zim.storage.store.Quotas), kept by appends and
  acks (computed once when an older database is upgraded).
- ``channels(name)``: a channel exists once anyone subscribed (it outlives its members).
  Version 4 adds ``creator``: the user whose subscribe created it (NULL for
  channels created before).
- ``members(channel, user_id, push)``: a rowid table so ``user_channels`` lists a
  user's channels in the order joined (as MemoryStore), via the index on user_id.
- ``conversations(conv, last_seq)``: one row per conversation, ``"c:<name>"`` for a
  channel and ``"u:<min id>:<max id>"`` for a user pair; ``last_seq`` is
  read-incremented in the transaction that inserts the message, so seq is 1, 2,
  3 ... with no gaps.
- ``messages(conv, seq, id, body, created_at)`` WITHOUT ROWID, keyed by (conv, seq):
  ``body`` is the orjson-encoded message (seq included), decoded back to an equal dict.
- ``mailbox(user_id, msg_id, conv, seq)``: unacknowledged direct messages, keyed by
  (user_id, msg_id) for acks. It is a rowid table (not WITHOUT ROWID) because
  MemoryStore pulls a mailbox in insertion order, whatever the ids look like: a new
  row's rowid is greater than every present one, so the index on user_id (which
  ends with the rowid) yields the oldest first. Version 4 adds ``size``: the
  length of the message's JSON as stored (what the quota counts), so an ack
  knows what it frees.

Writes are split into ``_write_<what>(cursor, ...)`` functions that take a cursor
and do not commit, so a later writer thread can run many of them in one
transaction; ``_transaction`` runs one of them in its own BEGIN IMMEDIATE ... COMMIT.
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
import time
from typing import Any, Callable, Iterable, Iterator, Union

import orjson

from zim.storage.retention import Retention
from zim.storage.store import (CHANNEL, MAX_USER_ID, USER, ChannelKey, HistoryKind, Message,
                       PairKey, Quotas, _encode_name, pair_key)

SCHEMA_VERSION = 4
# History and mailbox pages are bounded by bytes here, at the source, so that no
# answer of the writer is a monster (70 DMs of 64 KB made a 4.5 MB one). A page
# stops once its messages have passed PAGE_BYTES and it holds two of them: at most
# PAGE_BYTES and two messages. zim.im trims it to its budget (the same figure,
# measured the same way) and whatever it trims tells it there is more (hasMore),
# even when the first message alone is over the budget.
PAGE_BYTES = 1_000_000              # = zim.im.RESPONSE_BUDGET
PAGE_OVERHEAD = 64                  # = zim.im._PAGE_OVERHEAD: {"messages":[...],"hasMore":false}
BUSY_TIMEOUT_MS = 5000
_SIGNED_LIMIT = 1 << 63
_SQL_INT_MAX = (1 << 63) - 1

_SCHEMA = """
CREATE TABLE users (
    id   INTEGER PRIMARY KEY,
    name TEXT NOT NULL
);
CREATE TABLE channels (
    name TEXT PRIMARY KEY
) WITHOUT ROWID;
CREATE TABLE members (
    channel TEXT NOT NULL,
    user_id INTEGER NOT NULL,
    push    INTEGER NOT NULL,
    PRIMARY KEY (channel, user_id)
);
CREATE INDEX members_by_user ON members(user_id);
CREATE TABLE conversations (
    conv     TEXT PRIMARY KEY,
    last_seq INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE messages (
    conv       TEXT NOT NULL,
    seq        INTEGER NOT NULL,
    id         TEXT NOT NULL,
    body       BLOB NOT NULL,
    created_at INTEGER,
    PRIMARY KEY (conv, seq)
) WITHOUT ROWID;
CREATE TABLE mailbox (
    user_id INTEGER NOT NULL,
    msg_id  TEXT NOT NULL,
    conv    TEXT NOT NULL,
    seq     INTEGER NOT NULL,
    PRIMARY KEY (user_id, msg_id)
);
CREATE INDEX mailbox_by_user ON mailbox(user_id);
"""

# version 2 adds meta(key, value): "newest_id", the greatest message id stored, so
# the id generator moves past it after a restart even if the clock went back
_SCHEMA_V2 = """
CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value INTEGER NOT NULL
) WITHOUT ROWID;
"""

# version 3 adds users.token_epoch: the user's token generation ("log out
# everywhere" bumps it; zim.tokens), and, in a database that had users before,
# meta.tokens_v2_since: when it was upgraded, so that tokens of version 1 (which
# never expired) are accepted for one token lifetime from then on, not forever
_SCHEMA_V3 = """
ALTER TABLE users ADD COLUMN token_epoch INTEGER NOT NULL DEFAULT 0;
"""

# version 4 adds the quotas' bookkeeping (zim.storage.store.Quotas): each mailbox
# row's size (its message's JSON as stored), each user's mailbox count and bytes
# (kept by appends and acks, so a DM's check reads one row, no COUNT(*)), and
# each channel's creator (NULL: created before version 4, counts for nobody)
_SCHEMA_V4 = """
ALTER TABLE users ADD COLUMN mailbox_count INTEGER NOT NULL DEFAULT 0;
ALTER TABLE users ADD COLUMN mailbox_bytes INTEGER NOT NULL DEFAULT 0;
ALTER TABLE mailbox ADD COLUMN size INTEGER NOT NULL DEFAULT 0;
ALTER TABLE channels ADD COLUMN creator INTEGER;
"""
# ... and, in a database that had mailboxes before, computes them once
_MIGRATE_V4 = """
UPDATE mailbox SET size = coalesce((SELECT length(m.body) FROM messages AS m
                                    WHERE m.conv = mailbox.conv AND m.seq = mailbox.seq), 0);
UPDATE users SET mailbox_count = box.n, mailbox_bytes = box.bytes
    FROM (SELECT user_id, count(*) AS n, sum(size) AS bytes FROM mailbox GROUP BY user_id) AS box
    WHERE users.id = box.user_id;
"""


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


def _sql_id(user_id: int) -> int | None:
    """An unsigned 64-bit user id as the signed integer SQLite stores; None (which
    matches no row, and which a write refuses as NULL) for an id out of range."""
    if not isinstance(user_id, int) or not 0 < user_id <= MAX_USER_ID:
        return None
    return user_id - (1 << 64) if user_id >= _SIGNED_LIMIT else user_id


def _channel_conv(channel: str) -> str:
    return "c:" + channel


def _pair_conv(key: PairKey) -> str:
    low, high = pair_key(*key)
    return f"u:{low}:{high}"


def _check_user_id(user_id: int) -> None:
    if not isinstance(user_id, int) or not 0 < user_id <= MAX_USER_ID:
        raise ValueError(f"user id {user_id!r} is not in 1..2**64-1")


def _run_script(cur: sqlite3.Cursor, script: str) -> None:
    for statement in script.split(";"):
        if statement.strip():
            cur.execute(statement)


# ---------------------------------------------------------------- writes (no commit)


def _write_create_user(cur: sqlite3.Cursor, user_id: int, name: str) -> None:
    cur.execute("INSERT INTO users(id, name) VALUES (?, ?) ON CONFLICT(id) DO NOTHING",
                (_sql_id(user_id), name))
    if cur.rowcount != 1:
        raise ValueError(f"user {user_id} exists already")


def _write_set_user_name(cur: sqlite3.Cursor, user_id: int, name: str) -> None:
    cur.execute("UPDATE users SET name = ? WHERE id = ?", (name, _sql_id(user_id)))
    if cur.rowcount != 1:
        raise KeyError(f"no user {user_id}")


def _write_token_epoch(cur: sqlite3.Cursor, user_id: int, epoch: int) -> None:
    # never back: a revocation stays revoked whatever order writes come in
    cur.execute("UPDATE users SET token_epoch = max(token_epoch, ?) WHERE id = ?", (epoch, _sql_id(user_id)))
    if cur.rowcount != 1:
        raise KeyError(f"no user {user_id}")


def _write_subscribe(cur: sqlite3.Cursor, channel: str, user_id: int, push: bool) -> None:
    # the first subscriber creates the channel: its creator (zim.storage.store.Quotas)
    cur.execute("INSERT INTO channels(name, creator) VALUES (?, ?) ON CONFLICT(name) DO NOTHING",
                (channel, _sql_id(user_id)))
    cur.execute("INSERT INTO members(channel, user_id, push) VALUES (?, ?, ?) "
                "ON CONFLICT(channel, user_id) DO UPDATE SET push = excluded.push",
                (channel, _sql_id(user_id), int(bool(push))))


def _write_unsubscribe(cur: sqlite3.Cursor, channel: str, user_id: int) -> bool:
    cur.execute("DELETE FROM members WHERE channel = ? AND user_id = ?", (channel, _sql_id(user_id)))
    return cur.rowcount == 1


_MAILBOX_INSERT = ("INSERT INTO mailbox(user_id, msg_id, conv, seq, size) VALUES (?, ?, ?, ?, ?) "
                   "ON CONFLICT(user_id, msg_id) DO UPDATE SET conv = excluded.conv, seq = excluded.seq, "
                   "size = excluded.size")
ACK_CHUNK = 500               # ids per DELETE of an ack (SQLite's bound parameters: 999 in old builds)


def _write_mailbox_ack(cur: sqlite3.Cursor, user_id: int, ids: list[str]) -> tuple[int, int]:
    """Delete these ids from the mailbox; the (rows, bytes) that went."""
    uid = _sql_id(user_id)
    ids = list(dict.fromkeys(ids))
    rows = size = 0
    for first in range(0, len(ids), ACK_CHUNK):
        chunk = ids[first:first + ACK_CHUNK]
        cur.execute(f"DELETE FROM mailbox WHERE user_id = ? AND msg_id IN ({','.join('?' * len(chunk))}) "
                    "RETURNING size", (uid, *chunk))
        for (freed,) in cur.fetchall():
            rows += 1
            size += freed
    return rows, size


SEQ_CACHE_MAX = 100_000       # conversations whose last seq the writer remembers between batches
PRUNE_CONVERSATIONS = 256     # conversations looked at per prune call


def _write_prune(cur: sqlite3.Cursor, retention: Retention, now_ms: int, after: str,
                 row_budget: int) -> tuple[int, str | None]:
    deleted = 0
    done = after                  # the last conversation finished
    rows = cur.execute("SELECT conv, last_seq FROM conversations WHERE conv > ? ORDER BY conv LIMIT ?",
                       (after, PRUNE_CONVERSATIONS)).fetchall()
    for conv, last_seq in rows:
        is_channel = conv.startswith("c:")
        members = cur.execute("SELECT count(*) FROM members WHERE channel = ?",
                              (conv[2:],)).fetchone()[0] if is_channel else 0
        tier = retention.tier(is_channel, members)
        bound = last_seq - tier.cap if tier.cap else 0
        if tier.ttl_ms:
            row = cur.execute("SELECT seq FROM messages WHERE conv = ? AND (created_at IS NULL OR "
                              "created_at >= ?) ORDER BY seq LIMIT 1",
                              (conv, now_ms - tier.ttl_ms)).fetchone()
            bound = max(bound, row[0] - 1 if row else last_seq)
        first = cur.execute("SELECT min(seq) FROM messages WHERE conv = ?", (conv,)).fetchone()[0] \
            if bound > 0 else None
        if first is not None and first <= bound:
            upto = min(bound, first + max(row_budget - deleted, 1) - 1)
            if is_channel:
                cur.execute("DELETE FROM messages WHERE conv = ? AND seq BETWEEN ? AND ?",
                            (conv, first, upto))
            else:
                # a message still in a mailbox is kept until acked
                low, high = (_sql_id(int(part)) for part in conv[2:].split(":"))
                cur.execute("DELETE FROM messages WHERE conv = ? AND seq BETWEEN ? AND ? AND seq NOT IN "
                            "(SELECT seq FROM mailbox WHERE user_id IN (?, ?) AND conv = ?)",
                            (conv, first, upto, low, high, conv))
            deleted += cur.rowcount
            if upto < bound:
                return deleted, done      # this conversation has more: start there next time
        done = conv
        if deleted >= row_budget:
            return deleted, done
    return deleted, (done if len(rows) == PRUNE_CONVERSATIONS else None)


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
        try:
            conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            raise RuntimeError(f"cannot open the zim database {path!r}: {exc}") from exc
        try:
            self._open(conn)
        except sqlite3.DatabaseError as exc:
            conn.close()
            raise RuntimeError(f"cannot use the zim database {path!r} "
                               f"(corrupt, not a database, or not writable): {exc}") from exc
        except BaseException:
            conn.close()
            raise
        self._conn = conn

    def _open(self, conn: sqlite3.Connection) -> None:
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if mode.lower() != "wal" and self.path not in ("", ":memory:"):
            raise sqlite3.OperationalError(f"journal_mode is {mode!r}, not 'wal'")
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute("PRAGMA foreign_keys = OFF")
        cur = conn.cursor()
        cur.execute("BEGIN IMMEDIATE")   # takes the write lock: fails here if not writable
        try:
            version = cur.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise RuntimeError(
                    f"the zim database {self.path!r} has schema version {version}, newer than "
                    f"this zim's {SCHEMA_VERSION}: upgrade zim (or use another file)")
            if version == 0:
                _run_script(cur, _SCHEMA)
            if version < 2:
                _run_script(cur, _SCHEMA_V2)
            if version < 3:
                _run_script(cur, _SCHEMA_V3)
                if version > 0:     # users may hold version 1 tokens: they get one token lifetime
                    cur.execute("INSERT INTO meta(key, value) VALUES ('tokens_v2_since', ?) "
                                "ON CONFLICT(key) DO NOTHING", (time.time_ns() // 1_000_000,))
            if version < 4:
                _run_script(cur, _SCHEMA_V4)
                if version > 0:
                    _run_script(cur, _MIGRATE_V4)
            # always write: proves the file is writable now, not at the first send
            cur.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            cur.execute("SELECT count(*) FROM conversations").fetchone()
            row = cur.execute("SELECT max((SELECT max(id) FROM users), "
                              "coalesce((SELECT value FROM meta WHERE key = 'newest_id'), 0))").fetchone()
            self._newest_id = self._stored_newest_id = max(row[0] or 0, 0)
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        cur.execute("COMMIT")

    def set_quotas(self, quotas: Quotas) -> None:
        """The limits to enforce from now on. This store enforces the mailbox's
        (``append_user_message`` raises StoreRefusal); it records each channel's
        creator, but the count of channels a user created is checked by the
        server's store, which has every channel in memory (zim.storage.durable)."""
        self.quotas = quotas

    def _transaction(self, write: Callable[..., Any], *args: Any) -> Any:
        """Run one ``_write_*`` function in its own transaction, committed on
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
        if type(created_at) is not int or not -_SQL_INT_MAX <= created_at <= _SQL_INT_MAX:
            created_at = None
        self._message_rows.append((conv, seq, str(msg.get("id")), body, created_at))
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
        conv = _channel_conv(channel)
        seq = self._peek_seq(conv, channel)
        self._buffer_message(conv, msg, seq)
        return seq

    def _append_user(self, sender_id: int, receiver_id: int, msg: Message) -> int:
        conv = _pair_conv((sender_id, receiver_id))
        uid = _sql_id(receiver_id)
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
        if self._mailbox_rows:
            cur.executemany(_MAILBOX_INSERT, self._mailbox_rows)
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
            if self._newest_id < value <= _SQL_INT_MAX:
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
        _check_user_id(user_id)
        _encode_name(name)
        self._transaction(_write_create_user, user_id, name)

    def user_exists(self, user_id: int) -> bool:
        if not isinstance(user_id, int) or not 0 < user_id <= MAX_USER_ID:
            return False
        return self._one("SELECT 1 FROM users WHERE id = ?", (_sql_id(user_id),)) is not None

    def user_name(self, user_id: int) -> str | None:
        if not isinstance(user_id, int) or not 0 < user_id <= MAX_USER_ID:
            return None
        row = self._one("SELECT name FROM users WHERE id = ?", (_sql_id(user_id),))
        return None if row is None else row[0]

    def set_user_name(self, user_id: int, name: str) -> None:
        if not isinstance(user_id, int) or not 0 < user_id <= MAX_USER_ID:
            raise KeyError(f"no user {user_id}")
        _encode_name(name)
        self._transaction(_write_set_user_name, user_id, name)

    def token_epoch(self, user_id: int) -> int:
        """The user's token generation (0 for an unknown user)."""
        if not isinstance(user_id, int) or not 0 < user_id <= MAX_USER_ID:
            return 0
        row = self._one("SELECT token_epoch FROM users WHERE id = ?", (_sql_id(user_id),))
        return 0 if row is None else row[0]

    def set_token_epoch(self, user_id: int, epoch: int) -> None:
        """Raise the user's token generation to ``epoch`` (never lowers it);
        KeyError for an unknown user."""
        if not isinstance(user_id, int) or not 0 < user_id <= MAX_USER_ID:
            raise KeyError(f"no user {user_id}")
        if isinstance(epoch, bool) or not isinstance(epoch, int) or not 0 <= epoch <= _SQL_INT_MAX:
            raise ValueError(f"bad token epoch {epoch!r}")
        self._transaction(_write_token_epoch, user_id, epoch)

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
        self._transaction(_write_subscribe, channel, user_id, push)

    def unsubscribe(self, channel: str, user_id: int) -> bool:
        return self._transaction(_write_unsubscribe, channel, user_id)

    def membership(self, channel: str, user_id: int) -> bool | None:
        row = self._one("SELECT push FROM members WHERE channel = ? AND user_id = ?",
                        (channel, _sql_id(user_id)))
        return None if row is None else bool(row[0])

    def user_channels(self, user_id: int) -> list[tuple[str, bool]]:
        rows = self._connection().execute(
            "SELECT channel, push FROM members INDEXED BY members_by_user "
            "WHERE user_id = ? ORDER BY rowid", (_sql_id(user_id),)).fetchall()
        return [(channel, bool(push)) for channel, push in rows]

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
        if kind == CHANNEL:
            conv = _channel_conv(key)  # type: ignore[arg-type]
        elif kind == USER:
            conv = _pair_conv(key)  # type: ignore[arg-type]
        else:
            raise ValueError(f"unknown history kind {kind!r}")
        row = self._one("SELECT last_seq FROM conversations WHERE conv = ?", (conv,))
        last_seq = 0 if row is None else row[0]
        # the same arithmetic as zim.storage.store.page: seq n sits at index n - 1
        end = last_seq if before_seq is None else max(0, min(last_seq, before_seq - 1))
        start = max(0, end - max(limit, 0))
        if end <= start:
            return [], start > 0
        # the newest first, as far as PAGE_BYTES goes; then oldest first
        messages, cut = _bounded_page(self._connection().execute(
            "SELECT body FROM messages WHERE conv = ? AND seq > ? AND seq <= ? ORDER BY seq DESC",
            (conv, start, end)))
        messages.reverse()
        return messages, start > 0 or cut

    # -- mailboxes ---------------------------------------------------------
    def mailbox_pull(self, user_id: int, limit: int) -> list[Message]:
        """The oldest ``limit`` messages, as far as PAGE_BYTES goes (see there)."""
        if limit < 1:
            return []
        return _bounded_page(self._connection().execute(
            "SELECT m.body FROM mailbox AS b INDEXED BY mailbox_by_user "
            "JOIN messages AS m ON m.conv = b.conv AND m.seq = b.seq "
            "WHERE b.user_id = ? ORDER BY b.rowid LIMIT ?",
            (_sql_id(user_id), min(limit, _SQL_INT_MAX))))[0]

    def mailbox_ack(self, user_id: int, ids: Iterable[str]) -> None:
        # only strings can be mailbox keys (MemoryStore: dict keys are the str ids)
        wanted = [message_id for message_id in ids if isinstance(message_id, str)]
        if wanted:
            self._transaction(self._write_ack, user_id, wanted)

    def _write_ack(self, cur: sqlite3.Cursor, user_id: int, ids: list[str]) -> None:
        rows, size = _write_mailbox_ack(cur, user_id, ids)
        if rows:
            uid = _sql_id(user_id)
            usage = self._box_usage(uid)
            if usage is not None:
                usage[0] = max(0, usage[0] - rows)
                usage[1] = max(0, usage[1] - size)
                self._boxes_dirty.add(uid)

    def mailbox_usage(self, user_id: int) -> tuple[int, int]:
        """(messages, bytes) waiting in the user's mailbox, as counted for the quota."""
        uid = _sql_id(user_id)
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
        return self._transaction(_write_prune, retention, now_ms, after, row_budget)

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.execute("PRAGMA optimize")
            except sqlite3.Error:
                pass
            conn.close()
