"""The archive tier's write side on nodes (``--redis URL --archive DSN``).

- ``restore_conversation(redis, archive, kind, key)``: a conversation whose
  ``seq`` Redis lost (``APPEND_KEPT`` answered ``NEEDS_SEQ``) gets it back from
  PostgreSQL, so seq goes on where it was and never starts again at 1.
- ``Archiver``: on every node, the passes that copy what changed in Redis
  (the entries ``MARK`` recorded, zim.nodes.archive_schema) into PostgreSQL,
  one shard at a time under a lease; see its docstring and docs/redis.md,
  "The archive tier".
"""
from __future__ import annotations

import logging
import time
from typing import Any, Union

import orjson

from zim.archive.schema import migrate_on_link
from zim.archive.store import Archive, Changes
from zim.archive.stats import ArchiveStats, LagLog
from zim.nodes import schema
from zim.nodes.archive_schema import ARCHIVE_SHARDS, archive_keys, parse_entry
from zim.nodes.archive_scripts import (
    archived_command, done_command, parse_take, read_conversation_command, take_command,
)
from zim.pending import Pending, gather
from zim.storage.retention import Retention
from zim.storage.store import CHANNEL, ChannelKey, HistoryKind, PairKey

log = logging.getLogger("zim.archive")


def now_ms() -> int:
    return time.time_ns() // 1_000_000


# ---------------------------------------------------------------- restoring a conversation's seq


def restore_conversation(redis: Any, archive: Archive, kind: HistoryKind,
                         key: Union[ChannelKey, PairKey]) -> Pending:
    """Write a conversation's seq back into Redis from PostgreSQL: for a private
    channel ``private`` first, then ``archived`` and last ``seq`` (what makes a
    channel exist), each ``NX`` (a node restoring at the same time, or a channel
    created meanwhile, wins). Settles True once done, False for a channel the
    archive does not know (nothing written: it does not exist), or fails
    (PostgreSQL or Redis unreachable: retry later)."""
    result = Pending()
    archive.restore_point(kind, key).wait(_restore_point_read, result, (redis, kind, key))
    return result


def _conversation_keys(kind: HistoryKind, key: Any) -> schema.ConversationKeys:
    return schema.channel_keys(key) if kind == CHANNEL else schema.pair_keys(*key)


def _restore_point_read(result: Pending, how: tuple, ok: bool, value: Any) -> None:
    if not ok:
        result.settle(False, f"the archive could not be read to restore the conversation: {value}")
        return
    redis, kind, key = how
    seq, known, private = value
    if not known:
        result.settle(True, False)
        return
    keys = _conversation_keys(kind, key)
    commands = []
    if kind == CHANNEL and private:
        commands.append(("SET", schema.channel_access_keys(key).private, 1))
    commands += [("SET", archive_keys(keys).archived, seq, "NX"), ("SET", keys.seq, seq, "NX")]
    redis.pipeline(commands).wait(_restored, result, None)


def _restored(result: Pending, _: None, ok: bool, value: Any) -> None:
    result.settle(True, True) if ok else result.settle(False, value)


# ---------------------------------------------------------------- the archiver

LEASE_MS = 10_000           # a shard's lease: renewed at every pass, so a dead node's runs out in this
PASS_ENTRIES = 100          # entries one pass takes from a shard (oldest first)
IDLE_PASS = 0.1             # seconds between passes of a shard with nothing more to take
NOT_LEASED_RETRY = 1.0      # seconds before asking again for a shard another node holds
MAX_PASS_BACKOFF = 2.0      # seconds between passes that fail (PostgreSQL or Redis down): well within LEASE_MS
LINK_MAX_WAITING = 1024     # transactions on the link at once: the passes (8 at most) and the seq restores


class _Shard:
    """One shard's passes on this node."""

    __slots__ = ("index", "busy", "due", "failures", "held", "pending", "oldest_ms", "taken_ms")

    def __init__(self, index: int) -> None:
        self.index = index
        self.busy = False           # a pass is in flight (one at a time)
        self.due = 0.0              # monotonic time of the next pass
        self.failures = 0           # passes failed in a row (the back-off)
        self.held = False           # this node holds the lease
        self.pending = 0            # entries in the shard, as the last pass read
        self.oldest_ms: int | None = None   # the oldest entry's ``since``
        self.taken_ms = 0           # when the pass in flight took its entries (Unix ms)


class Archiver:
    """Copies the entries ``MARK`` recorded into PostgreSQL: see docs/redis.md, "The archive tier".

    Each shard has one pass in flight at most: TAKE (the lease, the oldest
    entries), a read of each entry's Redis state (one script or command in the
    entry's own slot, all at once), ONE PostgreSQL transaction with all of it
    (``Archive.archive_changes``), then ARCHIVED for each conversation whose
    messages it wrote, then DONE: an entry goes only if its version is still the
    one read and everything of it is in PostgreSQL (a conversation with more
    messages than one pass takes stays, and is taken again at once). A failed
    step leaves the entries where they are; the pass is made again after a
    back-off (each write is idempotent). ``stats`` (ArchiveStats) gets the lag,
    the entries pending, the messages stored and the failures.

    ``migrated``: False when the schema could not be migrated at the start
    (PostgreSQL unreachable): the archiver migrates it through the link, on the
    loop, before archiving anything.
    """

    def __init__(self, reactor: Any, redis: Any, dsn: str, node_id: str, retention: Retention,
                 kinds: frozenset[str], batch: int, migrated: bool = True) -> None:
        from zim.archive.link import PgLink     # here: psycopg is the archive extra's
        self.redis = redis
        self.node_id = node_id
        self.retention = retention
        self.kinds = kinds
        self.batch = batch
        self.migrated = migrated
        self.migrating = False
        self.stats = ArchiveStats()
        self.link = PgLink(reactor, dsn, on_state=self._link_state, max_waiting=LINK_MAX_WAITING)
        self.archive = Archive(self.link)
        self.shards = [_Shard(index) for index in range(ARCHIVE_SHARDS)]
        self._lag_log = LagLog()
        self._timer = reactor.timer(self._run)
        self._timer.set(time.monotonic_ns())

    def close(self) -> None:
        self._timer.close()
        self.link.close()

    # -- the loop's part ---------------------------------------------------------------
    def _link_state(self, state: str) -> None:
        self.stats.link_up = state == "up"
        if state == "up":       # (the link itself logs going down, and coming back after failures)
            log.info("archive link up")

    def _run(self) -> None:
        """Every IDLE_PASS: the passes that are due, the figures, the log of the lag."""
        now = time.monotonic()
        if not self.migrated and not self.migrating and self.link.state == "up":
            self._migrate()
        for shard in self.shards:
            if not shard.busy and shard.due <= now:
                self._pass(shard)
        self._figures(now)
        self._timer.set(time.monotonic_ns() + int(IDLE_PASS * 1e9))

    def _figures(self, now: float) -> None:
        held = [shard for shard in self.shards if shard.held]
        oldest = min((shard.oldest_ms for shard in held if shard.oldest_ms is not None), default=None)
        stats = self.stats
        stats.pending = sum(shard.pending for shard in held)
        stats.lag_seconds = 0.0 if oldest is None else max(0.0, (now_ms() - oldest) / 1000)
        link = "PostgreSQL up" if stats.link_up else f"PostgreSQL down: {self.link.last_error}"
        self._lag_log.observe(stats, now, "entries pending", link)

    def _migrate(self) -> None:
        self.migrating = True
        migrate_on_link(self.link).wait(self._migrated, None, None)

    def _migrated(self, _: None, __: None, ok: bool, value: Any) -> None:
        self.migrating = False
        if ok:
            self.migrated = True
            log.info("archive schema migrated")
        else:
            log.warning("archive schema migration failed (tried again when the link is up): %s", value)

    # -- a pass ----------------------------------------------------------------------------
    def _pass(self, shard: _Shard) -> None:
        shard.busy = True
        shard.taken_ms = now_ms()
        command = take_command(shard.index, self.node_id, LEASE_MS, PASS_ENTRIES)
        self.redis.call(*command).wait(self._taken, shard, None)

    def _idle(self, shard: _Shard, delay: float = IDLE_PASS) -> None:
        shard.busy = False
        shard.due = time.monotonic() + delay

    def _failed(self, shard: _Shard, why: str, reason: Any) -> None:
        shard.failures += 1
        self.stats.failures += why == "archive"
        if shard.failures == 1:
            log.warning("archive pass of shard %d failed (%s): %s; entries kept, tried again",
                        shard.index, why, reason)
        self._idle(shard, min(MAX_PASS_BACKOFF, IDLE_PASS * 2 ** shard.failures))

    def _taken(self, shard: _Shard, _: None, ok: bool, reply: Any) -> None:
        if not ok:
            self._failed(shard, "redis", reply)
            return
        taken = parse_take(reply)
        if taken is None:
            shard.held, shard.pending, shard.oldest_ms = False, 0, None
            self._idle(shard, NOT_LEASED_RETRY)
            return
        shard.held = True
        shard.pending, entries = taken
        shard.oldest_ms = entries[0][1] if entries else None
        if not entries or not self.migrated:
            self._idle(shard)
            return
        parsed = []
        for entry, _since, version in entries:
            try:
                parsed.append((entry, version, *parse_entry(entry)))
            except ValueError:
                log.error("archive shard %d: dropping the unknown entry %r", shard.index, entry)
                parsed.append((entry, version, "?", None))
        gather([self._read(kind, what) for _, _, kind, what in parsed]).wait(self._read_all, shard, parsed)

    def _read(self, kind: str, what: Any) -> Any:
        """The Redis state an entry is archived from (a Pending; None for an unknown entry)."""
        if kind == "c":
            return self.redis.call(*read_conversation_command(schema.channel_keys(what), what, self.batch))
        if kind == "u":
            return self.redis.call(*read_conversation_command(schema.pair_keys(*what), None, self.batch))
        if kind == "m":
            return self.redis.call("HMGET", schema.user_keys(what).user, "name", "epoch")
        if kind in ("j", "l"):
            user_id, channel = what
            return self.redis.pipeline([("HGET", schema.channel_keys(channel).members, user_id),
                                        ("EXISTS", schema.channel_access_keys(channel).private)])
        if kind in ("g", "r"):
            user_id, channel = what
            return self.redis.call("HGET", schema.channel_access_keys(channel).grants, user_id)
        if kind == "x":
            return self.redis.call("EXISTS", schema.channel_keys(what).seq)
        return None

    def _read_all(self, shard: _Shard, parsed: list, ok: bool, values: Any) -> None:
        if not ok:
            self._failed(shard, "redis", values)
            return
        changes = Changes()
        watermarks: list[tuple] = []
        done: list[tuple[str, bytes]] = []
        budget = self.batch
        for (entry, version, kind, what), value in zip(parsed, values):
            if kind in ("c", "u"):
                complete, budget = self._conversation(changes, watermarks, entry, kind, what, value, budget)
                if not complete:
                    continue
            else:
                _collect(changes, kind, what, value)
            done.append((entry, version))
        full = len(parsed) == PASS_ENTRIES or len(done) < len(parsed)
        if not changes:
            self._watermarked(shard, (done, full), True, None)
            return
        self.archive.archive_changes(changes).wait(self._committed, shard, (watermarks, done, full))

    def _conversation(self, changes: Changes, watermarks: list, entry: str, kind: str, what: Any,
                      value: Any, budget: int) -> tuple[bool, int]:
        """Add a conversation's seq (and channel row) and its unarchived messages, if
        its kind is kept, up to ``budget`` of them. (complete?, the budget left)."""
        if value is None:           # gone from Redis (lost, or a channel deleted): nothing to write
            return True, budget
        seq, archived, members, private, stream = int(value[0]), int(value[1]), int(value[2]), value[3], value[4]
        changes.seqs[entry] = seq
        channel = kind == "c"
        if channel:
            changes.channels[what] = bool(int(private))
            tier = "large" if 0 < self.retention.large_members <= members else "channel"
        else:
            tier = "private"
        if tier not in self.kinds:
            return True, budget
        taken = stream[:budget]
        upto = archived
        for entry_id, fields in taken:
            message = orjson.loads(schema._field(fields, b"m"))
            upto = message["seq"] = int(entry_id.split(b"-", 1)[0])
            changes.messages.append((entry, message))
        if len(taken) == len(stream) and len(stream) < self.batch:
            upto = seq              # everything above the watermark was read (trimmed ones are gone)
        if upto > archived:
            keys = schema.channel_keys(what) if channel else schema.pair_keys(*what)
            watermarks.append((keys, upto))
        return upto >= seq, budget - len(taken)

    def _committed(self, shard: _Shard, how: tuple, ok: bool, value: Any) -> None:
        if not ok:
            self._failed(shard, "archive", value)
            return
        self.stats.messages += value
        watermarks, done, full = how
        now = now_ms()      # ARCHIVED's TTL trim counts from the moment PostgreSQL confirmed
        raised = [self.redis.call(*archived_command(keys, upto, now, self.retention, self.kinds))
                  for keys, upto in watermarks]
        gather(raised).wait(self._watermarked, shard, (done, full))

    def _watermarked(self, shard: _Shard, how: tuple, ok: bool, value: Any) -> None:
        if not ok:
            self._failed(shard, "redis", value)
            return
        done, full = how
        command = done_command(shard.index, done, shard.taken_ms)
        if command is None:
            self._finished(shard, full, True, None)
        else:
            self.redis.call(*command).wait(self._finished, shard, full)

    def _finished(self, shard: _Shard, full: bool, ok: bool, value: Any) -> None:
        if not ok:
            self._failed(shard, "redis", value)
            return
        shard.failures = 0
        if full:
            self._pass(shard)       # more is waiting: at once
        else:
            self._idle(shard)


def _collect(changes: Changes, kind: str, what: Any, value: Any) -> None:
    """Add what an entry other than a conversation's says, where Redis agrees with it."""
    if kind == "m":
        name, epoch = value
        if name is not None:        # a user Redis lost is never removed from PostgreSQL
            changes.users.append((what, name.decode(), int(epoch or 0)))
    elif kind in ("j", "l"):
        user_id, channel = what
        push, private = value
        if kind == "j" and push is not None:
            changes.memberships.append((channel, user_id, push == b"1"))
            changes.channels.setdefault(channel, bool(private))
        elif kind == "l" and push is None:
            changes.left.append((channel, user_id))
    elif kind == "g" and value is not None:
        changes.grants.append((what[1], what[0], value == b"1"))
    elif kind == "r" and value is None:
        changes.revoked.append((what[1], what[0]))
    elif kind == "x" and not int(value):
        changes.deleted.append(what)
