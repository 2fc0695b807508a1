"""SQLiteStore's rows: how ids and conversations are stored, and the writes,
each a ``write_<what>(cursor, ...)`` function that takes a cursor and does not
commit, so that the writer process runs many of them in one transaction
(``SQLiteStore._transaction`` runs one in its own). Pruning by the retention
tiers (``write_prune``) is one of them, a bounded step at a time.
"""
from __future__ import annotations

import sqlite3

from zim.storage.retention import Retention
from zim.storage.store import MAX_USER_ID, PairKey, pair_key

_SIGNED_LIMIT = 1 << 63
SQL_INT_MAX = (1 << 63) - 1


# ---------------------------------------------------------------- ids and conversations


def sql_id(user_id: int) -> int | None:
    """An unsigned 64-bit user id as the signed integer SQLite stores; None (which
    matches no row, and which a write refuses as NULL) for an id out of range."""
    if not isinstance(user_id, int) or not 0 < user_id <= MAX_USER_ID:
        return None
    return user_id - (1 << 64) if user_id >= _SIGNED_LIMIT else user_id


def channel_conv(channel: str) -> str:
    return "c:" + channel


def pair_conv(key: PairKey) -> str:
    low, high = pair_key(*key)
    return f"u:{low}:{high}"


def check_user_id(user_id: int) -> None:
    if not isinstance(user_id, int) or not 0 < user_id <= MAX_USER_ID:
        raise ValueError(f"user id {user_id!r} is not in 1..2**64-1")


# ---------------------------------------------------------------- writes (no commit)


def write_create_user(cur: sqlite3.Cursor, user_id: int, name: str) -> None:
    cur.execute("INSERT INTO users(id, name) VALUES (?, ?) ON CONFLICT(id) DO NOTHING",
                (sql_id(user_id), name))
    if cur.rowcount != 1:
        raise ValueError(f"user {user_id} exists already")


def write_set_user_name(cur: sqlite3.Cursor, user_id: int, name: str) -> None:
    cur.execute("UPDATE users SET name = ? WHERE id = ?", (name, sql_id(user_id)))
    if cur.rowcount != 1:
        raise KeyError(f"no user {user_id}")


def write_token_epoch(cur: sqlite3.Cursor, user_id: int, epoch: int) -> None:
    # never back: a revocation stays revoked whatever order writes come in
    cur.execute("UPDATE users SET token_epoch = max(token_epoch, ?) WHERE id = ?", (epoch, sql_id(user_id)))
    if cur.rowcount != 1:
        raise KeyError(f"no user {user_id}")


def write_subscribe(cur: sqlite3.Cursor, channel: str, user_id: int, push: bool) -> None:
    # the first subscriber creates the channel: its creator (zim.storage.store.Quotas)
    cur.execute("INSERT INTO channels(name, creator) VALUES (?, ?) ON CONFLICT(name) DO NOTHING",
                (channel, sql_id(user_id)))
    cur.execute("INSERT INTO members(channel, user_id, push) VALUES (?, ?, ?) "
                "ON CONFLICT(channel, user_id) DO UPDATE SET push = excluded.push",
                (channel, sql_id(user_id), int(bool(push))))


def write_create_channel(cur: sqlite3.Cursor, channel: str, creator: int | None, private: bool) -> bool:
    """A channel without members (True), or nothing if it exists (False); the
    creator of a private one gets the invite right."""
    cur.execute("INSERT INTO channels(name, creator, private) VALUES (?, ?, ?) ON CONFLICT(name) DO NOTHING",
                (channel, None if creator is None else sql_id(creator), int(bool(private))))
    if cur.rowcount != 1:
        return False
    if private and creator is not None:
        write_grant(cur, channel, creator, True)
    return True


def write_grant(cur: sqlite3.Cursor, channel: str, user_id: int, can_invite: bool) -> None:
    cur.execute("INSERT INTO grants(channel, user_id, can_invite) VALUES (?, ?, ?) "
                "ON CONFLICT(channel, user_id) DO UPDATE SET can_invite = excluded.can_invite",
                (channel, sql_id(user_id), int(bool(can_invite))))


def write_revoke_grant(cur: sqlite3.Cursor, channel: str, user_id: int) -> bool:
    cur.execute("DELETE FROM grants WHERE channel = ? AND user_id = ?", (channel, sql_id(user_id)))
    return cur.rowcount == 1


def write_unsubscribe(cur: sqlite3.Cursor, channel: str, user_id: int) -> bool:
    cur.execute("DELETE FROM members WHERE channel = ? AND user_id = ?", (channel, sql_id(user_id)))
    return cur.rowcount == 1


def write_delete_channel(cur: sqlite3.Cursor, channel: str) -> list[int] | None:
    """The channel, its memberships and its history go; the members' ids (None:
    no such channel). Mailboxes hold no channel messages: nothing there."""
    cur.execute("DELETE FROM channels WHERE name = ?", (channel,))
    if cur.rowcount != 1:
        return None
    members = [user_id + (1 << 64) if user_id < 0 else user_id for (user_id,) in
               cur.execute("DELETE FROM members WHERE channel = ? RETURNING user_id", (channel,)).fetchall()]
    cur.execute("DELETE FROM grants WHERE channel = ?", (channel,))
    conv = channel_conv(channel)
    cur.execute("DELETE FROM messages WHERE conv = ?", (conv,))
    cur.execute("DELETE FROM conversations WHERE conv = ?", (conv,))
    return members


MAILBOX_INSERT = ("INSERT INTO mailbox(user_id, msg_id, conv, seq, size) VALUES (?, ?, ?, ?, ?) "
                  "ON CONFLICT(user_id, msg_id) DO UPDATE SET conv = excluded.conv, seq = excluded.seq, "
                  "size = excluded.size")
ACK_CHUNK = 500               # ids per DELETE of an ack (SQLite's bound parameters: 999 in old builds)


def write_mailbox_ack(cur: sqlite3.Cursor, user_id: int, ids: list[str]) -> tuple[int, int]:
    """Delete these ids from the mailbox; the (rows, bytes) that went."""
    uid = sql_id(user_id)
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


PRUNE_CONVERSATIONS = 256     # conversations looked at per prune call


def write_prune(cur: sqlite3.Cursor, retention: Retention, now_ms: int, after: str,
                row_budget: int, keep_queued: bool = False) -> tuple[int, str | None]:
    """``keep_queued``: keep every message from the conversation's oldest one in
    ``archive_queue`` on (the archive has not confirmed them yet)."""
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
        if keep_queued and bound > 0:
            queued = cur.execute("SELECT min(seq) FROM archive_queue WHERE conv = ?", (conv,)).fetchone()[0]
            if queued is not None:
                bound = min(bound, queued - 1)
        first = cur.execute("SELECT min(seq) FROM messages WHERE conv = ?", (conv,)).fetchone()[0] \
            if bound > 0 else None
        if first is not None and first <= bound:
            upto = min(bound, first + max(row_budget - deleted, 1) - 1)
            if is_channel:
                cur.execute("DELETE FROM messages WHERE conv = ? AND seq BETWEEN ? AND ?",
                            (conv, first, upto))
            else:
                # a message still in a mailbox is kept until acked
                low, high = (sql_id(int(part)) for part in conv[2:].split(":"))
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
