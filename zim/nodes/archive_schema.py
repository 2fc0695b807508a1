"""The Redis side of the archive tier (``--archive`` on nodes): key names and entries.

Builds keys and names only; the scripts and commands of the write side
(``zim.nodes.archive_scripts``, ``zim.nodes.archiving``) and of the read side (``zim.nodes.tiers``) are built
from these. docs/redis.md, "The archive tier", explains the layout.

Per conversation (in the conversation's hash slot, next to ``seq`` and ``log``
of ``zim.nodes.schema``):

- ``archived``: string, the highest seq PostgreSQL has confirmed. The log is
  never trimmed (cap, TTL) above it, and its key gets its TTL only once
  everything in it is archived. Never expires, like ``seq``.
- ``cold``: sorted set, score seq, member the message's JSON (seq set): pages
  read back from PostgreSQL, kept with the tier's TTL (a stream only grows at
  its end, so older messages cannot go back into ``log``).

Change tracking, in ``ARCHIVE_SHARDS`` shards of their own hash slots
(``{arch:N}``): what changed in Redis and is not in PostgreSQL yet, by
*entry* (``conversation_entry``, ``user_entry``, ``membership_entry``,
``leave_entry``, ``grant_entry``, ``revoked_grant_entry``,
``deleted_channel_entry``). An entry names what changed and its intent; the
archiver reads Redis's state when it takes the entry and writes it only if
Redis agrees with the intent (a joined membership Redis has, a removed one it
has not...), so a Redis that lost data never deletes anything in PostgreSQL:

- ``changed``: sorted set, entry -> version (from the shard's ``clock``, so a
  change made while an archiver works on an entry gives it a newer version,
  and the archiver removes only the version it saw);
- ``since``: sorted set, entry -> Unix ms of its oldest change not archived
  (the archive's lag, and the order entries are archived in);
- ``clock``: string, the shard's version counter;
- ``lease``: string, the id of the node archiving this shard (``SET NX PX``,
  renewed while it works; a dead node's lease runs out and another takes it).

One key for the whole Redis: ``GENERATION_KEY``, the *generation marker*, a
random token also kept in PostgreSQL's ``settings`` (``GENERATION_SETTING``).
It is set once, when the archive knows no conversation yet, and never expires:
while Redis holds the archive's value it has lost nothing since, so a
conversation without ``seq`` never existed and needs no PostgreSQL read. A
Redis that lost its data lost the marker too, and no node sets it again.
"""
from __future__ import annotations

import zlib
from typing import NamedTuple

from zim.nodes.schema import PREFIX, ConversationKeys

ARCHIVE_SHARDS = 8      # shards of the change tracking: each in its own slot, leased to one node at a time
GENERATION_KEY = f"{PREFIX}:archive-generation"     # the generation marker (a single Redis only)
GENERATION_SETTING = "redis-generation"             # its value in the archive's settings table


class ArchiveKeys(NamedTuple):
    """The archive's keys of one conversation, in its hash slot."""

    archived: str
    cold: str


def archive_keys(conversation: ConversationKeys) -> ArchiveKeys:
    """``archived`` and ``cold`` next to a conversation's ``seq`` and ``log``."""
    base = conversation.seq[: -len(":seq")]
    return ArchiveKeys(f"{base}:archived", f"{base}:cold")


class ShardKeys(NamedTuple):
    """The change tracking of one shard (hash tag ``{arch:N}``)."""

    changed: str
    since: str
    clock: str
    lease: str


def shard_keys(shard: int) -> ShardKeys:
    if not 0 <= shard < ARCHIVE_SHARDS:
        raise ValueError(f"an archive shard is 0..{ARCHIVE_SHARDS - 1}, not {shard}")
    base = f"{PREFIX}:{{arch:{shard}}}"
    return ShardKeys(f"{base}:changed", f"{base}:since", f"{base}:clock", f"{base}:lease")


def shard_of(entry: str) -> int:
    """The shard tracking an entry (stable across nodes and runs)."""
    return zlib.crc32(entry.encode()) % ARCHIVE_SHARDS


# -- entries: what changed (the archive's zim.archive.schema.conversation_key for conversations) --

def conversation_entry(conversation_key: str) -> str:
    """A conversation's messages and seq: ``c:NAME`` or ``u:LOW:HIGH``."""
    return conversation_key


def user_entry(user_id: int) -> str:
    """A user's record (name, token epoch): ``m:ID``."""
    return f"m:{user_id}"


def membership_entry(channel: str, user_id: int) -> str:
    """One membership (or its removal): ``j:ID:CHANNEL`` (the id first: a channel name may hold ':')."""
    return f"j:{user_id}:{channel}"


def leave_entry(channel: str, user_id: int) -> str:
    """A membership removed: ``l:ID:CHANNEL`` (deleted in PostgreSQL only if Redis has none)."""
    return f"l:{user_id}:{channel}"


def grant_entry(channel: str, user_id: int) -> str:
    """One grant of a private channel given or changed: ``g:ID:CHANNEL``."""
    return f"g:{user_id}:{channel}"


def revoked_grant_entry(channel: str, user_id: int) -> str:
    """A grant revoked: ``r:ID:CHANNEL`` (deleted in PostgreSQL only if Redis has none)."""
    return f"r:{user_id}:{channel}"


def deleted_channel_entry(channel: str) -> str:
    """A channel deleted: ``x:NAME`` (its rows go from PostgreSQL only if Redis has no
    such channel: not made again meanwhile)."""
    return f"x:{channel}"


def parse_entry(entry: str) -> tuple[str, object]:
    """``(kind, what)``: ``("c", name)``, ``("u", (low, high))``, ``("m", user id)``,
    ``("x", name)``, and ``(kind, (user id, channel))`` for ``j``, ``l``, ``g``, ``r``;
    ValueError otherwise."""
    kind, _, rest = entry.partition(":")
    try:
        if kind in ("c", "x") and rest:
            return kind, rest
        if kind == "u":
            low, high = rest.split(":")
            return kind, (int(low), int(high))
        if kind == "m":
            return kind, int(rest)
        if kind in ("j", "l", "g", "r"):
            user, _, channel = rest.partition(":")
            if channel:
                return kind, (int(user), channel)
    except ValueError:
        pass
    raise ValueError(f"not an archive entry: {entry!r}")
