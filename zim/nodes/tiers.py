"""History across the tiers of a node with ``--archive``: Redis's log, then ``cold``, then PostgreSQL.

``RedisStore.history`` calls ``tiered_history`` for a conversation whose kind
the archive keeps (``--archive-kinds``; a channel's tier is decided by its
member count, as the APPEND script decides it). A page has exactly
``zim.storage.store.Store.history``'s meaning (up to ``limit`` messages with
seq < ``before_seq``, the newest of those, oldest first, and whether older ones
exist), whichever tiers it comes from:

1. the log page (``XREVRANGE``), with ``GET seq`` (and ``HLEN members`` for a
   channel) in the same round trip to the conversation's slot (no ``seq``:
   Redis lost the conversation; it is restored from the archive first,
   ``RedisStore.restore_conversation``, and the page read again). The page is
   complete when the log gave ``limit + 1`` entries, or reached seq 1, or the
   conversation has no message (seq 0);
2. else the part below comes from ``cold`` (zim.nodes.archive_schema): only the
   run of consecutive seqs going down from where the log stopped counts (a gap
   means the set does not hold it all);
3. and the rest from PostgreSQL (``Archive.history``, counted in
   ``archive_stats.reads``), whose rows are then loaded into ``cold`` with the
   tier's TTL (a day when the tier has none), the set capped at
   ``COLD_MAX`` messages (the oldest trimmed), so the next read of those pages
   stays in Redis.

A failure of Redis or PostgreSQL fails the page (the handlers answer it as
any store failure): a partial page is never presented as complete.
"""
from __future__ import annotations

from typing import Any, Union

import orjson

from zim.nodes import schema
from zim.nodes.archive_schema import archive_keys
from zim.pending import Pending
from zim.storage.retention import DAY_MS, Retention, Tier
from zim.storage.store import CHANNEL, ChannelKey, HistoryKind, Message, PairKey

COLD_MAX = 10_000          # messages one conversation's ``cold`` set holds at most (the oldest go first)
COLD_TTL_MS = DAY_MS       # ``cold``'s TTL in a tier without one


def archived_tier(retention: Retention, kinds: frozenset[str], kind: HistoryKind, members: int) -> Tier | None:
    """The conversation's tier if the archive keeps it, else None."""
    if kind != CHANNEL:
        return retention.private if "private" in kinds else None
    large = members >= retention.large_members > 0
    if large:
        return retention.large if "large" in kinds else None
    return retention.channel if "channel" in kinds else None


def may_archive_channels(kinds: frozenset[str]) -> bool:
    """Whether a channel's page needs its member count to pick the tier."""
    return "channel" in kinds or "large" in kinds


def tiered_history(store: Any, kind: HistoryKind, key: Union[ChannelKey, PairKey],
                   keys: schema.ConversationKeys, before_seq: int | None, limit: int) -> Pending:
    """A page across the tiers (see the module docstring); ``store`` is the
    node's RedisStore, with ``archive``, ``archive_kinds`` and ``archive_stats`` set."""
    result = Pending()
    _read_log(result, _Read(store, kind, key, keys, before_seq, max(0, limit)))
    return result


def _read_log(result: Pending, read: _Read) -> None:
    keys = read.keys
    commands = [schema.history_command(keys, read.before_seq, read.limit), ("GET", keys.seq)]
    if keys.members is not None:
        commands.append(("HLEN", keys.members))
    read.store.redis.pipeline(commands).wait(_logged, result, read)


def _restored(result: Pending, read: _Read, ok: bool, value: Any) -> None:
    if not ok:
        result.settle(False, f"archive: {value}")
        return
    _read_log(result, read)


class _Read:
    """One page being read across the tiers: what each step needs of the one before."""

    __slots__ = ("store", "kind", "key", "keys", "before_seq", "limit", "messages", "tier", "restored")

    def __init__(self, store: Any, kind: HistoryKind, key: Any, keys: schema.ConversationKeys,
                 before_seq: int | None, limit: int) -> None:
        self.store, self.kind, self.key, self.keys = store, kind, key, keys
        self.before_seq, self.limit = before_seq, limit
        self.messages: list[Message] = []       # newest first, as the tiers give them
        self.tier: Tier | None = None
        self.restored = False                   # the seq counter was asked of the archive

    def lowest(self) -> int | None:
        return self.messages[-1]["seq"] if self.messages else None

    def wanted(self) -> int:
        return self.limit - len(self.messages)

    def page(self, has_more: bool) -> tuple[list[Message], bool]:
        return self.messages[::-1], has_more


def _logged(result: Pending, read: _Read, ok: bool, replies: Any) -> None:
    if not ok:
        result.settle(False, replies)
        return
    try:
        log_reply, seq = replies[0], replies[1]
        members = int(replies[2]) if len(replies) > 2 else 0
        store = read.store
        read.tier = archived_tier(store.retention, store.archive_kinds, read.kind, members)
        oldest_first, has_more = schema.parse_history(log_reply, read.limit)
    except Exception as exc:  # noqa: BLE001 -- a bad reply fails the page, not the loop
        result.settle(False, f"bad reply from redis: {exc}")
        return
    if seq is None and read.tier is not None and not read.restored:
        # Redis lost the conversation's seq (and whatever else): the archive says
        # where it was, and the page is read again
        read.restored = True
        store.restore_conversation(read.kind, read.key).wait(_restored, result, read)
        return
    read.messages = oldest_first[::-1]
    lowest = read.lowest()
    # (a log page of exactly ``limit`` still asks below it: whether older ones exist)
    if read.tier is None or has_more or lowest == 1 or seq == b"0":
        result.settle(True, (oldest_first, has_more))
        return
    # the part below the log: below the lowest it gave, else below before_seq
    # (and at most the conversation's seq, when Redis still knows it)
    if lowest is None:
        lowest = schema.MAX_SEQ if read.before_seq is None else read.before_seq
        if seq is not None:
            lowest = min(lowest, int(seq) + 1)
    if lowest <= 1:
        result.settle(True, read.page(False))
        return
    cold = archive_keys(read.keys).cold
    # one more than wanted: whether it is there says whether older ones exist
    command = ("ZRANGE", cold, lowest - 1, "-inf", "BYSCORE", "REV", "LIMIT", 0, read.wanted() + 1)
    store.redis.call(*command).wait(_from_cold, result, (read, lowest))


def _from_cold(result: Pending, step: tuple, ok: bool, members: Any) -> None:
    read, lowest = step
    if not ok:
        result.settle(False, members)
        return
    try:
        for member in members:
            message = orjson.loads(member)
            if message.get("seq") != lowest - 1:
                break       # a gap: the rest comes from PostgreSQL
            if not read.wanted():
                result.settle(True, read.page(True))     # one older than the page is there
                return
            read.messages.append(message)
            lowest -= 1
    except (ValueError, TypeError) as exc:
        result.settle(False, f"bad reply from redis: {exc}")
        return
    if lowest <= 1:
        result.settle(True, read.page(False))
        return
    store = read.store
    store.archive_stats.reads += 1
    store.archive.history(read.kind, read.key, lowest, read.wanted()).wait(_from_archive, result, read)


def _from_archive(result: Pending, read: _Read, ok: bool, value: Any) -> None:
    if not ok:
        result.settle(False, f"archive: {value}")
        return
    oldest_first, has_more = value
    if oldest_first:
        _load_cold(read, oldest_first)
        read.messages.extend(reversed(oldest_first))
    result.settle(True, read.page(has_more))


def _load_cold(read: _Read, messages: list[Message]) -> None:
    """The pages just read from PostgreSQL into ``cold``, for the next reader
    (not waited for: the reply does not depend on it)."""
    tier = read.tier
    cold = archive_keys(read.keys).cold
    scored: list[Any] = []
    for message in messages:
        scored += (message["seq"], orjson.dumps(message))
    cap = max(min(tier.cap or COLD_MAX, COLD_MAX), len(messages))
    read.store.redis.pipeline([
        ("ZADD", cold, *scored),
        ("ZREMRANGEBYRANK", cold, 0, -(cap + 1)),
        ("PEXPIRE", cold, tier.ttl_ms or COLD_TTL_MS),
    ])
