"""The SQLite database file of ``SQLiteStore``: its settings, its schema and the
upgrades from older versions, applied by ``open_database`` when a store opens it.

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

Schema (version 6; the versions' changes are applied in ``open_database``):

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
  user's channels in the order joined, via the index on user_id (MemoryStore keeps
  that order until a leave moves its last channel into the hole: zim._tables).
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
- Version 5 adds private channels (docs/protocol.md): ``channels.private`` (1:
  joined only with a grant) and ``grants(channel, user_id, can_invite)``, who
  may join a private channel (an invitation, the server API) and may invite.
- Version 6 adds ``archive_queue(pos, conv, seq)``: with ``--archive``, the
  messages stored and not yet confirmed by PostgreSQL (zim.storage.archiver),
  in the order stored. ``pos`` is AUTOINCREMENT, so it only ever grows (never
  reused once the queue is empty); rows go from the low end once PostgreSQL
  has committed them, and pruning keeps every message a row names. A row of
  seq 0 is a deleted channel's tombstone (the archive forgets it too).
"""
from __future__ import annotations

import sqlite3
import time

SCHEMA_VERSION = 6
BUSY_TIMEOUT_MS = 5000

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

# version 5 adds private channels: the flag, and who may join one (and invite)
_SCHEMA_V5 = """
ALTER TABLE channels ADD COLUMN private INTEGER NOT NULL DEFAULT 0;
CREATE TABLE grants (
    channel    TEXT NOT NULL,
    user_id    INTEGER NOT NULL,
    can_invite INTEGER NOT NULL,
    PRIMARY KEY (channel, user_id)
) WITHOUT ROWID;
"""

# version 6 adds the archive's queue (zim.storage.archiver)
_SCHEMA_V6 = """
CREATE TABLE archive_queue (
    pos  INTEGER PRIMARY KEY AUTOINCREMENT,
    conv TEXT NOT NULL,
    seq  INTEGER NOT NULL
);
CREATE INDEX archive_queue_by_conv ON archive_queue(conv, seq);
"""


def _run_script(cur: sqlite3.Cursor, script: str) -> None:
    for statement in script.split(";"):
        if statement.strip():
            cur.execute(statement)


def open_database(conn: sqlite3.Connection, path: str) -> int:
    """Set the connection up (WAL, synchronous, busy timeout), create or upgrade
    the schema in one transaction, and return the greatest user or message id
    stored (0: none). RuntimeError for a database of a newer zim; sqlite3 errors
    for a file that is not a database, is corrupt or cannot be written."""
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
    if mode.lower() != "wal" and path not in ("", ":memory:"):
        raise sqlite3.OperationalError(f"journal_mode is {mode!r}, not 'wal'")
    conn.execute("PRAGMA synchronous = NORMAL")
    conn.execute("PRAGMA foreign_keys = OFF")
    cur = conn.cursor()
    cur.execute("BEGIN IMMEDIATE")   # takes the write lock: fails here if not writable
    try:
        version = cur.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise RuntimeError(
                f"the zim database {path!r} has schema version {version}, newer than "
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
        if version < 5:
            _run_script(cur, _SCHEMA_V5)
        if version < 6:
            _run_script(cur, _SCHEMA_V6)
        # always write: proves the file is writable now, not at the first send
        cur.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        cur.execute("SELECT count(*) FROM conversations").fetchone()
        row = cur.execute("SELECT max((SELECT max(id) FROM users), "
                          "coalesce((SELECT value FROM meta WHERE key = 'newest_id'), 0))").fetchone()
        newest_id = max(row[0] or 0, 0)
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    cur.execute("COMMIT")
    return newest_id
