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
  ``memberships_of``, ``channel``: what a cache that lost its data is filled from.
- ``archive_changes(changes)``: a node archiver's pass (``Changes``: messages,
  seq counters, users, memberships, channels, grants and their removals) in one
  transaction, idempotent; settles with the number of messages newly stored.
- ``restore_point(kind, key)``: what a cache that lost a conversation's seq
  restores it from: ``(seq, known, private)``.
"""
from __future__ import annotations

from typing import Any, Iterable, Union

import orjson

from zim.archive.link import PgLink
from zim.archive.schema import conversation_key, months_of, partition_ddl
from zim.pending import Pending
from zim.storage.store import CHANNEL, ChannelKey, HistoryKind, Message, PairKey

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
_RESTORE_POINT = (
    "SELECT (SELECT seq FROM conversations WHERE conversation = $1), "
    "(SELECT private FROM channels WHERE name = $2)")
# a pass's rows, each statement on a JSON array of rows (one parameter, any number of rows)
_ROWS = "json_array_elements($1::json) AS r"
_DELETE_CHANNELS = tuple(
    (f"DELETE FROM {table} WHERE {column} IN (SELECT json_array_elements_text($1::json){suffix})")
    for table, column, suffix in (("messages", "conversation", " AS c"), ("conversations", "conversation", ""),
                                  ("memberships", "channel", ""), ("grants", "channel", ""),
                                  ("channels", "name", "")))
_SAVE_USERS = (f"INSERT INTO users (id, name, token_epoch) SELECT (r->>0)::numeric, r->>1, (r->>2)::bigint "
               f"FROM {_ROWS} ON CONFLICT (id) DO UPDATE SET name = excluded.name, "
               "token_epoch = greatest(users.token_epoch, excluded.token_epoch)")
_SAVE_CHANNELS = (f"INSERT INTO channels (name, private) SELECT r->>0, (r->>1)::boolean FROM {_ROWS} "
                  "ON CONFLICT (name) DO UPDATE SET private = excluded.private")
_SAVE_MEMBERSHIPS = (f"INSERT INTO memberships (channel, user_id, push) SELECT r->>0, (r->>1)::numeric, "
                     f"(r->>2)::boolean FROM {_ROWS} ON CONFLICT (channel, user_id) DO UPDATE SET push = excluded.push")
_REMOVE_MEMBERSHIPS = (f"DELETE FROM memberships m USING {_ROWS} "
                       "WHERE m.channel = r->>0 AND m.user_id = (r->>1)::numeric")
_SAVE_GRANTS = (f"INSERT INTO grants (channel, user_id, can_invite) SELECT r->>0, (r->>1)::numeric, "
                f"(r->>2)::boolean FROM {_ROWS} ON CONFLICT (channel, user_id) DO UPDATE "
                "SET can_invite = excluded.can_invite")
_REMOVE_GRANTS = f"DELETE FROM grants g USING {_ROWS} WHERE g.channel = r->>0 AND g.user_id = (r->>1)::numeric"
_PAGE = ("SELECT body FROM messages WHERE conversation = $1 AND seq < $2::bigint "
         "ORDER BY seq DESC LIMIT $3::bigint")


class Changes:
    """What one pass of a node's archiver writes (``Archive.archive_changes``).
    Rows are plain tuples; user ids may be strings or ints (numeric(20) takes either)."""

    __slots__ = ("messages", "seqs", "users", "channels", "memberships", "left", "grants", "revoked",
                 "deleted")

    def __init__(self) -> None:
        self.messages: list[tuple[str, Message]] = []       # (conversation key, message with seq)
        self.seqs: dict[str, int] = {}                      # conversation key -> seq counter
        self.users: list[tuple[int, str, int]] = []         # (id, name, token epoch)
        self.channels: dict[str, bool] = {}                 # name -> private
        self.memberships: list[tuple[str, int, bool]] = []  # (channel, user id, push)
        self.left: list[tuple[str, int]] = []               # (channel, user id)
        self.grants: list[tuple[str, int, bool]] = []       # (channel, user id, can invite)
        self.revoked: list[tuple[str, int]] = []            # (channel, user id)
        self.deleted: list[str] = []                        # channels gone, with all of theirs

    def __bool__(self) -> bool:
        return any(getattr(self, name) for name in self.__slots__)


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

    def archive_changes(self, changes: Changes) -> Pending:
        """One transaction with everything of ``changes`` (see ``Changes``): deletions
        first, then upserts; settles with the number of messages newly stored."""
        statements: list[tuple[str, tuple]] = []
        if changes.deleted:
            names = orjson.dumps(changes.deleted)
            conversations = orjson.dumps(["c:" + name for name in changes.deleted])
            statements += [(sql, (conversations if index < 2 else names,))
                           for index, sql in enumerate(_DELETE_CHANNELS)]
        rows = [(_message_id(message.get("id")), conversation, message["seq"], message)
                for conversation, message in changes.messages]
        months = months_of(row[0] for row in rows)
        statements += [(partition_ddl(*month), ()) for month in sorted(months - self._months)]
        upsert = len(statements)
        statements.append((_UPSERT_MESSAGES, (orjson.dumps(rows),)))
        for sql, found in ((_RAISE_SEQ, list(changes.seqs.items())), (_SAVE_USERS, changes.users),
                           (_SAVE_CHANNELS, list(changes.channels.items())),
                           (_SAVE_MEMBERSHIPS, changes.memberships), (_REMOVE_MEMBERSHIPS, changes.left),
                           (_SAVE_GRANTS, changes.grants), (_REMOVE_GRANTS, changes.revoked)):
            if found:
                statements.append((sql, (orjson.dumps(found, default=str),)))
        result = Pending()
        self.link.transaction(statements).wait(_changes_archived, (self, result), (months, upsert))
        return result

    def restore_point(self, kind: HistoryKind, key: Union[ChannelKey, PairKey]) -> Pending:
        """Settles with ``(seq, known, private)``: the conversation's seq counter (0:
        none), whether the archive knows it (a pair always counts as known: it
        needs no creation), and a channel's private flag."""
        conversation = conversation_key(kind, key)
        result = Pending()
        name = key if isinstance(key, str) else ""
        self.link.transaction([(_RESTORE_POINT, (conversation, name))]).wait(
            _restore_row, result, not isinstance(key, str))
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

    # -- reads and restores for a cache that lost its data ----------------------------------
    def channel(self, name: str) -> Pending:
        """Settles with what a cache needs to restore a channel, in one transaction:
        ``(private, seq, grants, members)`` (``grants`` ``[(user id, can_invite)]``,
        ``members`` ``[(user id, push)]``, seq the highest archived), or None when
        the archive has no such channel."""
        result = Pending()
        self.link.transaction([
            ("SELECT private FROM channels WHERE name = $1", (name,)),
            ("SELECT seq FROM conversations WHERE conversation = $1", (conversation_key(CHANNEL, name),)),
            ("SELECT user_id, can_invite FROM grants WHERE channel = $1", (name,)),
            ("SELECT user_id, push FROM memberships WHERE channel = $1", (name,)),
        ]).wait(_channel_rows, result, None)
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


def _changes_archived(shared: tuple, how: tuple, ok: bool, value: Any) -> None:
    archive, result = shared
    if not ok:
        result.settle(False, value)
        return
    months, upsert = how
    archive._months |= months
    result.settle(True, len(value[upsert]))


def _restore_row(result: Pending, pair: bool, ok: bool, value: Any) -> None:
    if not ok:
        result.settle(False, value)
        return
    seq, private = value[0][0]
    known = pair or seq is not None or private is not None
    result.settle(True, (int(seq or 0), known, private == b"t"))


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


def _channel_rows(result: Pending, _: None, ok: bool, value: Any) -> None:
    if not ok:
        result.settle(False, value)
        return
    flag, seq, grants, members = value
    if not flag:
        result.settle(True, None)
        return
    result.settle(True, (flag[0][0] == b"t", int(seq[0][0]) if seq else 0,
                         [(int(user), invite == b"t") for user, invite in grants],
                         [(int(user), push == b"t") for user, push in members]))


def _written(result: Pending, _: None, ok: bool, value: Any) -> None:
    result.settle(True, None) if ok else result.settle(False, value)


def _one_value(result: Pending, how: tuple, ok: bool, value: Any) -> None:
    if not ok:
        result.settle(False, value)
        return
    convert, default = how
    rows = value[0]
    result.settle(True, convert(rows[0][0]) if rows else default)
