"""``Archive``: what the nodes and the single server will ask of PostgreSQL.

Every call returns a ``zim.pending.Pending`` settled from the loop (it runs on
a ``PgLink``): ``ok=True`` with the value once PostgreSQL has committed (or
answered a read), ``ok=False`` with a reason (str) otherwise. A failed write
may or may not have been committed: every write is idempotent, so the caller
sends it again.

- ``archive_messages(batch)``: upsert messages by id, each with its
  conversation (``(kind, key, message)``; the message dict as the store holds
  it, ``seq`` set). A message already archived is left as it is: the same
  batch twice stores each message once. The month partitions the batch needs
  are created in the same transaction first (``schema.partition_ddl``); the
  conversations' seq counters rise to the batch's highest seq with it.
  Settles with the number of messages newly stored.
- ``history(kind, key, before_seq, limit)``: a page with exactly
  ``zim.storage.store.Store.history``'s meaning: up to ``limit`` messages with
  seq < ``before_seq`` (any, when None), the newest of those, oldest first,
  and whether older ones exist.
- ``highest_seq(kind, key)``: the conversation's seq counter (0: none).
- ``forget_conversation(kind, key)``: its messages and counter deleted (a
  deleted channel).
- ``save_user``/``user``, ``save_membership``/``remove_membership``/
  ``memberships_of``: what a cache that lost its data is filled from.
"""
from __future__ import annotations

from typing import Any, Iterable, Union

import orjson

from zim.archive.link import PgLink
from zim.archive.schema import conversation_key, months_of, partition_ddl
from zim.pending import Pending
from zim.storage.store import ChannelKey, HistoryKind, Message, PairKey

ArchivedMessage = tuple[HistoryKind, Union[ChannelKey, PairKey], Message]
NO_BOUND = (1 << 63) - 1    # "before_seq" when the caller gives none

_UPSERT_MESSAGES = (
    "INSERT INTO messages (id, conversation, seq, body) "
    "SELECT (m->>0)::bigint, m->>1, (m->>2)::bigint, m->3 FROM json_array_elements($1::json) AS m "
    "ON CONFLICT (id) DO NOTHING RETURNING id")
_RAISE_SEQ = (
    "INSERT INTO conversations (conversation, seq) "
    "SELECT m->>0, max((m->>1)::bigint) FROM json_array_elements($1::json) AS m GROUP BY 1 "
    "ON CONFLICT (conversation) DO UPDATE SET seq = greatest(conversations.seq, excluded.seq)")
_PAGE = ("SELECT body FROM messages WHERE conversation = $1 AND seq < $2::bigint "
         "ORDER BY seq DESC LIMIT $3::bigint")


class Archive:
    """The archive's calls on one ``PgLink``; see the module docstring. The schema
    must be migrated first (``zim.archive.schema.migrate``)."""

    def __init__(self, link: PgLink) -> None:
        self.link = link
        self._months: set[tuple[int, int]] = set()     # partitions known to exist

    # -- messages --------------------------------------------------------------------
    def archive_messages(self, batch: Iterable[ArchivedMessage]) -> Pending:
        rows, counters = [], {}
        for kind, key, message in batch:
            conversation = conversation_key(kind, key)
            message_id, seq = message.get("id"), message.get("seq")
            if not isinstance(seq, int) or seq < 1:
                raise ValueError(f"message {message_id!r} has no seq: archive messages once stored")
            number = _message_id(message_id)
            rows.append((number, conversation, seq, message))
            counters[conversation] = max(seq, counters.get(conversation, 0))
        if not rows:
            raise ValueError("an empty batch")
        months = months_of(row[0] for row in rows)
        statements: list[tuple[str, tuple]] = [(partition_ddl(*month), ()) for month in sorted(months - self._months)]
        statements.append((_UPSERT_MESSAGES, (orjson.dumps(rows),)))
        statements.append((_RAISE_SEQ, (orjson.dumps(list(counters.items())),)))
        result = Pending()
        self.link.transaction(statements).wait(_archived, (self, result), months)
        return result

    def history(self, kind: HistoryKind, key: Union[ChannelKey, PairKey],
                before_seq: int | None, limit: int) -> Pending:
        """Settles with ``(messages, has_more)``: see the module docstring."""
        bound = NO_BOUND if before_seq is None else max(0, min(before_seq, NO_BOUND))
        limit = max(0, limit)
        result = Pending()
        # one row more than asked: whether it comes says whether older messages exist
        self.link.transaction([(_PAGE, (conversation_key(kind, key), bound, limit + 1))]).wait(
            _paged, result, limit)
        return result

    def highest_seq(self, kind: HistoryKind, key: Union[ChannelKey, PairKey]) -> Pending:
        """Settles with the conversation's highest archived seq (0: none)."""
        return self._one_value("SELECT seq FROM conversations WHERE conversation = $1",
                               (conversation_key(kind, key),), int, 0)

    def forget_conversation(self, kind: HistoryKind, key: Union[ChannelKey, PairKey]) -> Pending:
        """Delete the conversation's messages and seq counter (a channel deleted:
        one made again under its name starts from seq 1). Idempotent."""
        conversation = conversation_key(kind, key)
        result = Pending()
        self.link.transaction([("DELETE FROM messages WHERE conversation = $1", (conversation,)),
                               ("DELETE FROM conversations WHERE conversation = $1", (conversation,))]).wait(
            _written, result, None)
        return result

    # -- users and memberships -------------------------------------------------------------
    def save_user(self, user_id: int, name: str, token_epoch: int) -> Pending:
        """Insert or replace a user's name and token epoch (the epoch never goes back)."""
        return self._write(
            "INSERT INTO users (id, name, token_epoch) VALUES ($1::numeric, $2, $3::bigint) "
            "ON CONFLICT (id) DO UPDATE SET name = excluded.name, "
            "token_epoch = greatest(users.token_epoch, excluded.token_epoch)", (user_id, name, token_epoch))

    def user(self, user_id: int) -> Pending:
        """Settles with ``(name, token_epoch)``, or None for an unknown user."""
        result = Pending()
        self.link.transaction([("SELECT name, token_epoch FROM users WHERE id = $1::numeric", (user_id,))]).wait(
            _user_row, result, None)
        return result

    def save_membership(self, channel: str, user_id: int, push: bool) -> Pending:
        return self._write(
            "INSERT INTO memberships (channel, user_id, push) VALUES ($1, $2::numeric, $3::boolean) "
            "ON CONFLICT (channel, user_id) DO UPDATE SET push = excluded.push", (channel, user_id, push))

    def remove_membership(self, channel: str, user_id: int) -> Pending:
        return self._write("DELETE FROM memberships WHERE channel = $1 AND user_id = $2::numeric",
                           (channel, user_id))

    def memberships_of(self, user_id: int) -> Pending:
        """Settles with the user's ``[(channel, push), ...]``, sorted by channel."""
        result = Pending()
        self.link.transaction([("SELECT channel, push FROM memberships WHERE user_id = $1::numeric "
                                "ORDER BY channel", (user_id,))]).wait(_membership_rows, result, None)
        return result

    # -- plumbing --------------------------------------------------------------------------
    def _write(self, sql: str, params: tuple) -> Pending:
        result = Pending()
        self.link.transaction([(sql, params)]).wait(_written, result, None)
        return result

    def _one_value(self, sql: str, params: tuple, convert: Any, default: Any) -> Pending:
        result = Pending()
        self.link.transaction([(sql, params)]).wait(_one_value, result, (convert, default))
        return result


def _message_id(value: Any) -> int:
    """A message's id (a decimal string on the wire) as the bigint it is stored as."""
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"a message id is a decimal Snowflake, not {value!r}") from None
    return number


# -- what each call's result becomes (module functions: no closure per call) ------------------

def _archived(shared: tuple, months: set, ok: bool, value: Any) -> None:
    archive, result = shared
    if not ok:
        result.settle(False, value)
        return
    archive._months |= months
    result.settle(True, len(value[-2]))      # the rows the upsert returned: the new ones


def _paged(result: Pending, limit: int, ok: bool, value: Any) -> None:
    if not ok:
        result.settle(False, value)
        return
    rows = value[0]
    newest_first = [orjson.loads(row[0]) for row in rows[:limit]]
    newest_first.reverse()
    result.settle(True, (newest_first, len(rows) > limit))


def _user_row(result: Pending, _: None, ok: bool, value: Any) -> None:
    if not ok:
        result.settle(False, value)
        return
    rows = value[0]
    result.settle(True, (rows[0][0].decode(), int(rows[0][1])) if rows else None)


def _membership_rows(result: Pending, _: None, ok: bool, value: Any) -> None:
    if not ok:
        result.settle(False, value)
        return
    result.settle(True, [(channel.decode(), push == b"t") for channel, push in value[0]])


def _written(result: Pending, _: None, ok: bool, value: Any) -> None:
    result.settle(True, None) if ok else result.settle(False, value)


def _one_value(result: Pending, how: tuple, ok: bool, value: Any) -> None:
    if not ok:
        result.settle(False, value)
        return
    convert, default = how
    rows = value[0]
    result.settle(True, convert(rows[0][0]) if rows else default)
