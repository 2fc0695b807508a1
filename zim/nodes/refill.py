"""Refilling a Redis that lost its data from the archive (``--archive`` on nodes), as it is used.

Redis restarted without its AOF, ``FLUSHALL``, a failover to an empty
replica: with ``--archive`` a "no" from Redis is not "new" until PostgreSQL
says so. ``RedisStore`` asks here whenever Redis lacks a user or a channel:

- ``restore_user``: the user's name and token epoch (the epoch never goes
  back, so a revoked token stays revoked), its channel index, and each of its
  channels (``ensure_channel``);
- ``restore_conversation``: a conversation whose seq Redis lost (an append
  answered ``NEEDS_SEQ``, a history read found none): a channel through
  ``ensure_channel``, a user pair's seq (zim.nodes.archiving);
- ``ensure_channel``: a channel Redis does not have is restored whole when
  the archive knows it: its seq (goes on from where it was, never from 1) and
  ``archived`` watermark, its private flag, grants and members, in one script
  that does nothing if the channel exists meanwhile (another node restored
  it, or a newer one was made).

On a single Redis holding the archive's generation marker (``store.generation``,
zim.nodes.archive_schema) a conversation or channel Redis lacks never existed:
``known_here`` says so without PostgreSQL, which may then be down.

Every write is idempotent and never overwrites something Redis holds
(``HSETNX``, ``SET NX``, the epoch only raised), so two nodes restoring at
once agree. A failure of PostgreSQL fails the call: the handlers answer the
store failure, never treat "unknown" as "new".

The token secret's refill is at the node's start: ``zim.nodes.node.Node``
with ``zim.archive.schema.shared_settings``.
"""
from __future__ import annotations

from typing import Any

from zim.nodes import schema
from zim.nodes.archive_scripts import HERE, NEEDS_SEQ, known_here_command
from zim.nodes.archiving import restore_conversation as restore_pair
from zim.nodes.archive_schema import archive_keys
from zim.nodes.steps import after
from zim.pending import Pending, gather
from zim.storage.store import CHANNEL

# KEYS: user. ARGV: name, archived epoch. The name if Redis has none; the epoch
# raised to the archived one (never lowered: a revocation made since stays).
RESTORE_USER = schema.Script("restore_user", """
redis.call('HSETNX', KEYS[1], 'name', ARGV[1])
local epoch = tonumber(redis.call('HGET', KEYS[1], 'epoch') or '0')
if tonumber(ARGV[2]) > epoch then
  redis.call('HSET', KEYS[1], 'epoch', ARGV[2])
  epoch = tonumber(ARGV[2])
end
return epoch
""")

# KEYS: seq, archived, private, grants, members. ARGV: seq, private flag, number
# of grant pairs, then (user, flag) pairs of the grants and of the members.
# Restore a channel the archive knows: 1; 0 if the channel exists (nothing done).
RESTORE_CHANNEL = schema.Script("restore_channel", """
if not redis.call('SET', KEYS[1], ARGV[1], 'NX') then return 0 end
redis.call('SET', KEYS[2], ARGV[1], 'NX')
if ARGV[2] == '1' then redis.call('SET', KEYS[3], 1) end
local grants_end = 3 + 2 * tonumber(ARGV[3])
for i = 4, grants_end, 2 do redis.call('HSETNX', KEYS[4], ARGV[i], ARGV[i + 1]) end
for i = grants_end + 1, #ARGV, 2 do redis.call('HSETNX', KEYS[5], ARGV[i], ARGV[i + 1]) end
return 1
""")
def restore_user(store: Any, user_id: int) -> Pending:
    """Settles with the user's token epoch once restored from the archive, or None
    if the archive does not know the user either."""
    archive = store.archive
    return after(gather([archive.user(user_id), archive.memberships_of(user_id)]),
                  lambda found: _restore_user(store, user_id, *found))


def _restore_user(store: Any, user_id: int, record: Any, memberships: list) -> Pending | None:
    if record is None:
        return None
    name, epoch = record
    keys = schema.user_keys(user_id)
    steps = [store.redis.call(*RESTORE_USER.command((keys.user,), [name, epoch]))]
    if memberships:
        steps.append(store.redis.pipeline([("HSETNX", keys.channels, channel, "1" if push else "0")
                                           for channel, push in memberships]))
    steps += [ensure_channel(store, channel) for channel, _ in memberships]
    return after(gather(steps), lambda replies: int(replies[0]))


def restore_conversation(store: Any, kind: str, key: Any) -> Pending:
    """A conversation whose seq Redis lost, back from the archive: a channel whole
    (``ensure_channel``), a user pair's seq and ``archived``
    (zim.nodes.archiving.restore_conversation). Settles True, or False when the
    archive does not know it. A Redis holding the generation marker answers
    alone (``known_here``): a pair it lacks is new (started at seq 0)."""
    if kind == CHANNEL:
        return ensure_channel(store, key)
    if store.generation is None:
        return _restore_pair(store, kind, key)
    known = known_here(store, schema.pair_keys(*key))
    return after(known, lambda answer: True if answer is not None else _restore_pair(store, kind, key))


def _restore_pair(store: Any, kind: str, key: Any) -> Pending:
    _count_restore(store)
    return restore_pair(store.redis, store.archive, kind, key)


def ensure_channel(store: Any, channel: str) -> Pending:
    """Settles True once Redis has the channel (restored from the archive if it
    was not there), False if neither has it (or Redis, holding the generation
    marker, has lost nothing: the archive is not asked)."""
    keys = schema.channel_keys(channel)
    if store.generation is None:
        found = after(store.redis.call("EXISTS", keys.seq), lambda exists: True if int(exists) else None)
    else:
        found = known_here(store, keys)
    return after(found, lambda known: known if known is not None else _restore_channel(store, channel))


def known_here(store: Any, keys: schema.ConversationKeys) -> Pending:
    """Settles True (Redis has the conversation), False (it does not, and has lost
    nothing since the generation marker was set: it never existed; a pair is
    started at seq 0) or None (only the archive can say)."""
    answer = store.redis.call(*known_here_command(keys, store.generation))
    return after(answer, lambda reply: _known(store, int(reply)))


def _known(store: Any, reply: int) -> bool | None:
    if reply == NEEDS_SEQ:
        store.generation_lost()
        return None
    return reply == HERE


def _restore_channel(store: Any, channel: str) -> Pending:
    _count_restore(store)
    return after(store.archive.channel(channel), lambda found: _write_channel(store, channel, found))


def _count_restore(store: Any) -> None:
    if store.archive_stats is not None:
        store.archive_stats.restores += 1


def _write_channel(store: Any, channel: str, found: Any) -> Pending | bool:
    if found is None:
        return False
    private, seq, grants, members = found
    keys, access = schema.channel_keys(channel), schema.channel_access_keys(channel)
    args: list[Any] = [seq, "1" if private else "0", len(grants)]
    for user_id, can_invite in grants:
        args += (user_id, "1" if can_invite else "0")
    for user_id, push in members:
        args += (user_id, "1" if push else "0")
    command = RESTORE_CHANNEL.command(
        (keys.seq, archive_keys(keys).archived, access.private, access.grants, keys.members), args)
    return after(store.redis.call(*command), lambda _: True)
