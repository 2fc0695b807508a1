"""Rows written into a real PostgreSQL archive by the tests of the read side.

What the nodes' archiver writes (messages with their seq counters, users,
memberships, channels, grants), written here from what a test saw while Redis
held everything, with the archiver's idempotence (``ON CONFLICT``): a row the
archiver wrote already is left as it is. The read side's tests then take
Redis's copy away (TTL, cap, FLUSHALL) and check what comes back.
"""
from __future__ import annotations

from typing import Iterable

import orjson

from zim.archive.schema import conversation_key, months_of, partition_ddl
from zim.storage.store import CHANNEL, USER


def _run(dsn: str, statements: list[tuple[str, tuple]]) -> None:
    import psycopg
    with psycopg.connect(dsn, autocommit=False) as conn:
        for sql, params in statements:
            conn.execute(sql, params)


def archive_messages(dsn: str, messages: Iterable[dict], channel: str | None = None,
                     pair: tuple[int, int] | None = None) -> None:
    """Messages (as history answered them, seq set) of a channel or a user pair."""
    messages = list(messages)
    key = conversation_key(CHANNEL, channel) if channel is not None else conversation_key(USER, pair)
    statements = [(partition_ddl(*month), ()) for month in sorted(months_of(int(m["id"]) for m in messages))]
    statements += [("INSERT INTO messages (id, conversation, seq, body) VALUES (%s, %s, %s, %s::json) "
                    "ON CONFLICT (id) DO NOTHING", (int(m["id"]), key, m["seq"], orjson.dumps(m).decode()))
                   for m in messages]
    statements.append(("INSERT INTO conversations (conversation, seq) VALUES (%s, %s) ON CONFLICT (conversation) "
                       "DO UPDATE SET seq = greatest(conversations.seq, excluded.seq)",
                       (key, max(m["seq"] for m in messages))))
    _run(dsn, statements)


def archive_user(dsn: str, user_id: int, name: str, epoch: int = 0,
                 channels: Iterable[str] = ()) -> None:
    """A user and its memberships (push on)."""
    statements = [("INSERT INTO users (id, name, token_epoch) VALUES (%s, %s, %s) ON CONFLICT (id) DO UPDATE "
                   "SET token_epoch = greatest(users.token_epoch, excluded.token_epoch)", (user_id, name, epoch))]
    statements += [("INSERT INTO memberships (channel, user_id, push) VALUES (%s, %s, true) ON CONFLICT DO NOTHING",
                    (channel, user_id)) for channel in channels]
    _run(dsn, statements)


def archive_channel(dsn: str, name: str, private: bool, grants: Iterable[tuple[int, bool]] = ()) -> None:
    """A channel (whether private) and its grants (user id, may invite)."""
    statements = [("INSERT INTO channels (name, private) VALUES (%s, %s) ON CONFLICT DO NOTHING", (name, private))]
    statements += [("INSERT INTO grants (channel, user_id, can_invite) VALUES (%s, %s, %s) ON CONFLICT DO NOTHING",
                    (name, user_id, can_invite)) for user_id, can_invite in grants]
    _run(dsn, statements)
