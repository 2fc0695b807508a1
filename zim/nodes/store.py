"""``RedisStore``: the Store of a node, over the Redis layout of ``zim.nodes.schema``.

Messages, history and mailboxes live only in Redis: every append, page and
mailbox call is a command (or two) on the node's ``RedisClient`` and answers
with a ``Pending`` that settles once Redis has replied, so a client is
acknowledged only after Redis holds its message.

Users, channels and memberships live in Redis too, and each node keeps a
*cache* of them in a ``MemoryStore`` so that the checks of every request
(does the receiver exist, is the sender a member) read nothing remote:

- what this node wrote is in its cache at once (and undone if Redis refused);
- what other nodes change reaches it over the change feed (``apply_change``,
  a pub/sub channel every node subscribes to), token revocations included;
- a "no" from the cache may still be stale (the change was made a moment ago
  on another node), so the handlers ask ``confirm_user`` / ``confirm_member``
  before answering ``not_found``, ``forbidden`` or ``unauthorized``
  (``zim.im.rechecking``); those read Redis and update the cache. A user's
  token epoch is read from Redis at every token login and refresh
  (``confirm_token_epoch``): a stale cached epoch would be a stale "yes".

Users are never deleted, so a cached user never becomes wrong; a cached
membership can be stale only for the moment a feed message takes.

Quotas (``set_quotas``) are enforced in Redis, atomically, never by the cache
(which is a MemoryStore without quotas): a direct message first holds room in
the receiver's mailbox (refused: ``mailbox_full``, and nothing is stored), a
subscribe that creates a channel first claims one of the user's channel
creations (refused: ``too_many_channels``); see zim.nodes.schema and
docs/redis.md. A refusal settles the call with ``StoreRefusal``.

With ``--archive`` (``archive`` set: zim.nodes.node wires it) every change the
archive must keep is *marked* for the archiver (zim.nodes.archiving) once Redis
holds it, and the call settles only after the mark is recorded too; appends use
``APPEND_KEPT``, which answers ``NEEDS_SEQ`` for a conversation whose seq Redis
lost: it is restored from PostgreSQL first (``restore_conversation``), then
appended again. On a single Redis that holds the archive's generation marker
(``generation``) a pair without seq is new: its append starts it at once,
PostgreSQL neither asked nor needed. Without ``--archive`` nothing of this is sent.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Callable, Iterable, Union

from zim.archive.schema import conversation_key
from zim.nodes import archive_schema, refill, schema
from zim.nodes.archive_schema import archive_keys
from zim.nodes.archive_scripts import NEEDS_SEQ, append_kept_command, mark_command
from zim.nodes.steps import Shared, after, both, relay, shared
from zim.nodes.tiers import may_archive_channels, tiered_history
from zim.pending import Pending, gather
from zim.storage.retention import Retention
from zim.storage.store import (
    CHANNEL, NO_QUOTAS, USER, ChannelKey, HistoryKind, MemoryStore, Message, PairKey, Quotas, StoreRefusal,
    pair_key,
)

log = logging.getLogger("zim.nodes")

Change = dict       # a change-feed entry: {"k": kind, ...}; see RedisStore.apply_change


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def _text(value: bytes | str | None) -> str | None:
    return value.decode("utf-8") if isinstance(value, bytes) else value


class RedisStore:
    """A Store over Redis for one node of several; see the module docstring.

    ``redis`` is the node's ``zim.nodes.client.RedisClient`` (it may be set after
    construction, before the first call); ``on_change(change)`` publishes a change
    on the feed for the other nodes (set by ``zim.nodes.node.Node``).
    """

    def __init__(self, retention: Retention = Retention(), redis: Any = None,
                 on_change: Callable[[Change], None] | None = None) -> None:
        self.retention = retention
        self.redis = redis
        self.on_change = on_change
        self.cache = MemoryStore()
        self.cache.set_quotas(NO_QUOTAS)             # the quotas are Redis's to enforce
        self.quotas = Quotas()
        self._user_writes: dict[int, Pending] = {}   # a user's record write not yet answered
        # the archive tier (--archive; set by zim.nodes.node.Node): the zim.archive.store.Archive,
        # the kinds it keeps (zim.archive.config.ARCHIVE_KINDS) and its figures (metrics)
        self.archive: Any = None
        self.archive_kinds: frozenset[str] = frozenset()
        self.archive_stats: Any = None
        # the generation marker's value while Redis holds the archive's (a single Redis; set by
        # zim.nodes.node.Node): a missing seq is then a new conversation, no PostgreSQL read
        self.generation: bytes | None = None
        self._restoring: dict[Any, Shared] = {}     # conversation -> its seq's restore under way
        self._marks_due: dict[str, Shared] = {}     # conversation entries to mark at the next loop pass
        self._mark_timer: Any = None

    def set_quotas(self, quotas: Quotas) -> None:
        """The limits every node of a service should share (zim.storage.store.Quotas)."""
        self.quotas = quotas

    # -- users ---------------------------------------------------------------
    def create_user(self, user_id: int, name: str) -> Pending:
        self.cache.create_user(user_id, name)
        return self._marked(self._write_user(user_id, name), archive_schema.user_entry(user_id))

    def user_exists(self, user_id: int) -> bool:
        return self.cache.user_exists(user_id)

    def user_name(self, user_id: int) -> str | None:
        return self.cache.user_name(user_id)

    def set_user_name(self, user_id: int, name: str) -> Pending:
        self.cache.set_user_name(user_id, name)
        self._publish({"k": "name", "u": user_id, "name": name})
        return self._marked(self._write_user(user_id, name), archive_schema.user_entry(user_id))

    def _write_user(self, user_id: int, name: str) -> Pending:
        written = shared(self.redis.call(*schema.user_record_command(user_id, name)))
        self._user_writes[user_id] = written
        written.wait(self._user_written, user_id, written)
        return written

    def _user_written(self, user_id: int, written: Pending, ok: bool, value: Any) -> None:
        if self._user_writes.get(user_id) is written:
            del self._user_writes[user_id]

    def confirm_user(self, user_id: int) -> Pending | None:
        """Read the user (name and channels) from Redis into the cache; None if it
        is cached already (users are never deleted)."""
        if self.cache.user_exists(user_id):
            return None
        read = self._read_user(user_id)
        if self.archive is None:
            return read
        # Redis may have lost it: the archive says (zim.nodes.refill)
        return after(read, lambda known: known or after(refill.restore_user(self, user_id),
                                                        lambda epoch: epoch is not None and self._read_user(user_id)))

    def _read_user(self, user_id: int) -> Pending:
        keys = schema.user_keys(user_id)
        return after(self.redis.pipeline([("HGET", keys.user, "name"), ("HGETALL", keys.channels)]),
                     lambda replies: self._learn_user(user_id, *replies))

    # -- token generations ----------------------------------------------------
    def token_epoch(self, user_id: int) -> int:
        """The cached epoch: current but for the moment a feed message takes."""
        return self.cache.token_epoch(user_id)

    def confirm_token_epoch(self, user_id: int) -> Pending:
        """The user's epoch as Redis holds it (a revocation on another node counts
        at once), into the cache too. With the archive, a user Redis lost is
        restored first: its archived epoch counts (zim.nodes.refill)."""
        if self.archive is None:
            return after(self.redis.call(*schema.token_epoch_command(user_id)),
                         lambda reply: self._learn_epoch(user_id, int(reply or 0), exact=True))
        read = self.redis.call("HMGET", schema.user_keys(user_id).user, "name", "epoch")
        return after(read, lambda reply: self._epoch_or_restore(user_id, *reply))

    def _epoch_or_restore(self, user_id: int, name: Any, epoch: Any) -> Any:
        if name is not None:
            return self._learn_epoch(user_id, int(epoch or 0), exact=True)
        return after(refill.restore_user(self, user_id),
                     lambda restored: self._learn_epoch(user_id, restored or 0, exact=True))

    def _learn_epoch(self, user_id: int, epoch: int, exact: bool = False) -> int:
        """Into the cache: Redis's value as read (``exact``), or a newer one heard of."""
        cache = self.cache
        if exact or epoch > cache.token_epoch(user_id):
            cache.set_token_epoch(user_id, epoch)
        return epoch

    def revoke_tokens(self, user_id: int) -> Pending:
        """Bump the epoch in Redis (HINCRBY); once Redis has it, the cache takes it
        and the feed tells the other nodes (which close the user's connections)."""
        revoked = after(self.redis.call(*schema.revoke_tokens_command(user_id)),
                        lambda reply: self._revoked(user_id, int(reply)))
        return self._marked(revoked, archive_schema.user_entry(user_id))

    def _revoked(self, user_id: int, epoch: int) -> int:
        self._learn_epoch(user_id, epoch)
        self._publish({"k": "epoch", "u": user_id, "e": epoch})
        return epoch

    def _learn_user(self, user_id: int, name: bytes | None, channels: Any) -> bool:
        if name is None:
            return False
        cache = self.cache
        if not cache.user_exists(user_id):
            cache.create_user(user_id, _text(name))
        for channel, push in _pairs(channels):
            cache.subscribe(_text(channel), user_id, push == b"1")
        return True

    # -- channels ------------------------------------------------------------
    def channel_exists(self, channel: str) -> bool:
        return self.cache.channel_exists(channel)

    def membership(self, channel: str, user_id: int) -> bool | None:
        return self.cache.membership(channel, user_id)

    def user_channels(self, user_id: int) -> list[tuple[str, bool]]:
        return self.cache.user_channels(user_id)

    def confirm_member(self, channel: str, user_id: int) -> Pending:
        """Read whether the channel exists and the user's membership from Redis into the cache."""
        keys = schema.channel_keys(channel)
        read = self._with_channel(channel, lambda: self.redis.pipeline([("EXISTS", keys.seq),
                                                                        ("HGET", keys.members, user_id)]))
        return after(read, lambda replies: self._learn_member(channel, user_id, *replies))

    def _with_channel(self, channel: str, command: Callable[[], Pending]) -> Pending:
        """``command()``'s Pending; with the archive, once a channel Redis lost is
        restored (zim.nodes.refill), so that its "no such channel" is true."""
        if self.archive is None:
            return command()
        return after(refill.ensure_channel(self, channel), lambda _: command())

    def _learn_member(self, channel: str, user_id: int, exists: int, push: bytes | None) -> bool:
        cache = self.cache
        if push is not None:
            cache.subscribe(channel, user_id, push == b"1")
        else:
            if exists:
                cache.add_channel(channel)
            cache.unsubscribe(channel, user_id)
        return push is not None

    def subscribe(self, channel: str, user_id: int, push: bool) -> Pending:
        """Join the channel if it exists; else claim one of the user's channel
        creations (refused: StoreRefusal ``too_many_channels``, nothing stored),
        create it and join. Then the user's index. A join of a channel the cache
        did not know (the handler checked no grant) refuses one made private
        meanwhile on another node (StoreRefusal ``forbidden``, nothing stored)."""
        cache = self.cache
        existed, old = cache.channel_exists(channel), cache.membership(channel, user_id)
        cache.subscribe(channel, user_id, push)
        join = schema.channel_join_command(channel, user_id, push, public_only=not existed)
        joined = self._with_channel(channel, lambda: self.redis.call(*join))
        done = shared(after(joined, lambda reply: self._joined(channel, user_id, push, reply)))
        done.wait(self._member_written, (channel, user_id, existed, old), {"k": "member", "c": channel,
                                                                          "u": user_id, "p": int(push)})
        return self._marked(after(done, lambda _: None), archive_schema.membership_entry(channel, user_id))

    def _joined(self, channel: str, user_id: int, push: bool, reply: Any) -> Pending:
        if int(reply) == schema.FOUND_PRIVATE:
            raise _found_private(channel)
        if int(reply):
            return self._index(channel, user_id, push)
        # no such channel: this subscribe creates it
        claim = schema.channel_claim_command(user_id, channel, self.quotas.max_channels_per_user)
        return after(self.redis.call(*claim), lambda reply: self._claimed(channel, user_id, push, int(reply)))

    def _claimed(self, channel: str, user_id: int, push: bool, claim: int) -> Pending:
        if claim == schema.CLAIM_REFUSED:
            raise self.quotas.too_many_channels()
        created = self.redis.call(*schema.channel_create_command(channel, user_id, push))
        return after(created, lambda made: self._created(channel, user_id, push, claim, int(made)))

    def _created(self, channel: str, user_id: int, push: bool, claim: int, made: int) -> Pending:
        # created meanwhile by someone else: a creation claimed just now goes back
        unclaim = claim == schema.CLAIMED and made != 1
        if made == schema.FOUND_PRIVATE:
            if unclaim:
                self.redis.call(*schema.unclaim_command(user_id, channel))
            raise _found_private(channel)
        return self._index(channel, user_id, push, unclaim=unclaim)

    def _index(self, channel: str, user_id: int, push: bool, unclaim: bool = False) -> Pending:
        commands = schema.channel_index_commands(channel, user_id, push, unclaim)
        return self.redis.pipeline(commands) if len(commands) > 1 else self.redis.call(*commands[0])

    def unsubscribe(self, channel: str, user_id: int) -> Pending:
        cache = self.cache
        old = cache.membership(channel, user_id)
        cache.unsubscribe(channel, user_id)
        first, second = schema.unsubscribe_steps(channel, user_id)
        done = shared(after(self.redis.call(*first), lambda _: self.redis.call(*second)))
        done.wait(self._member_written, (channel, user_id, True, old),
                  {"k": "member", "c": channel, "u": user_id, "p": None})
        return self._marked(after(done, lambda removed: bool(removed)),
                            archive_schema.leave_entry(channel, user_id))

    def channel_count(self) -> int:
        """The channels this node knows of (its cache: not every channel of the service)."""
        return self.cache.channel_count()

    def channel_members(self, channel: str) -> Pending:
        """The ids of the channel's members, as Redis holds them (the cache knows
        only the users this node has seen)."""
        return after(self.redis.call("HKEYS", schema.channel_keys(channel).members),
                     lambda ids: [int(user_id) for user_id in ids])

    def delete_channel(self, channel: str) -> Pending:
        """A Pending of the former members' ids (None: no such channel); the
        other nodes drop it from their caches over the feed (kind "drop")."""
        deleted = self._with_channel(channel, lambda: self.redis.call(*schema.channel_delete_command(channel)))
        if self.archive is not None:    # a channel made again under this name starts unarchived
            forgotten = archive_keys(schema.channel_keys(channel))
            deleted = _then(deleted, self.redis.call("DEL", *forgotten))
        return self._marked(after(deleted, lambda reply: self._channel_deleted(channel, reply)),
                            archive_schema.deleted_channel_entry(channel))

    def _channel_deleted(self, channel: str, reply: Any) -> Any:
        self.cache.delete_channel(channel)
        if reply is None:
            return None
        members = [int(user_id) for user_id in reply]
        self._publish({"k": "drop", "c": channel})
        unindexed = [self.redis.call(*command) for command in schema.channel_unindex_commands(channel, members)]
        return after(gather(unindexed), lambda _: members)     # each in its own slot

    def _member_written(self, before: tuple, change: Change, ok: bool, value: Any) -> None:
        if ok:
            self._publish(change)
            return
        channel, user_id, existed, old = before      # Redis refused: the cache goes back
        cache = self.cache
        if old is None:
            cache.unsubscribe(channel, user_id)
            if not existed:
                cache.drop_channel(channel)
        else:
            cache.subscribe(channel, user_id, old)

    # -- private channels ------------------------------------------------------
    def create_channel(self, channel: str, creator: int | None, private: bool) -> Pending:
        """The creator's creation claimed first (refused: StoreRefusal
        ``too_many_channels``), then the channel made with its flag; settles True,
        or False if it existed (the claim given back, its flag read into the cache)."""
        if creator is None:
            return self._make_channel(channel, None, private, schema.CLAIMED_BEFORE)
        claim = schema.channel_claim_command(creator, channel, self.quotas.max_channels_per_user)
        return after(self.redis.call(*claim),
                     lambda reply: self._make_claimed(channel, creator, private, int(reply)))

    def _make_claimed(self, channel: str, creator: int, private: bool, claim: int) -> Pending:
        if claim == schema.CLAIM_REFUSED:
            raise self.quotas.too_many_channels()
        return self._make_channel(channel, creator, private, claim)

    def _make_channel(self, channel: str, creator: int | None, private: bool, claim: int) -> Pending:
        made = self._with_channel(channel, lambda: self.redis.call(*schema.channel_make_command(channel, creator,
                                                                                                 private)))
        return after(made, lambda reply: self._made(channel, creator, private, claim, int(reply)))

    def _made(self, channel: str, creator: int | None, private: bool, claim: int, made: int) -> Any:
        if made:
            self._learn_channel(channel, bool(private), creator)
            self._publish({"k": "channel", "c": channel, "pv": int(bool(private)), "u": creator})
            entries = [archive_schema.conversation_entry(conversation_key(CHANNEL, channel))]
            if private and creator is not None:     # CHANNEL_MAKE granted the creator the invite right
                entries.append(archive_schema.grant_entry(channel, creator))
            return self._marked(True, *entries)
        read = self.confirm_join(channel, creator) if creator is not None else self._read_privacy(channel)
        if claim == schema.CLAIMED and creator is not None:
            read = both(self.redis.call(*schema.unclaim_command(creator, channel)), read)
        return after(read, lambda _: False)

    def _learn_channel(self, channel: str, private: bool, creator: int | None) -> None:
        cache = self.cache
        cache.add_channel(channel, private=private)
        if private and creator is not None:
            cache.grant(channel, creator, True)

    def channel_private(self, channel: str) -> bool:
        return self.cache.channel_private(channel)

    def confirm_join(self, channel: str, user_id: int) -> Pending:
        """Read what a join or an invitation decides on into the cache, in one
        round trip to the channel's slot: whether the channel exists and is
        private, the user's membership and grant. (The cache may have learnt of
        a channel without its flag: every join of a non-member asks.)"""
        read = self._with_channel(channel, lambda: self.redis.pipeline(schema.channel_join_reads(channel, user_id)))
        return after(read, lambda replies: self._learn_join(channel, user_id, *replies))

    def _learn_join(self, channel: str, user_id: int, exists: Any, private: Any, push: Any, grant: Any) -> bool:
        cache = self.cache
        if not int(exists):
            return False
        cache.add_channel(channel, private=private is not None)
        cache.set_grant(channel, user_id, None if grant is None else grant == b"1")
        if push is None:
            cache.unsubscribe(channel, user_id)
        else:
            cache.subscribe(channel, user_id, push == b"1")
        return True

    def _read_privacy(self, channel: str) -> Pending:
        commands = schema.channel_join_reads(channel, 0)[:2]
        return after(self._with_channel(channel, lambda: self.redis.pipeline(commands)),
                     lambda replies: self._learn_privacy(channel, *replies))

    def _learn_privacy(self, channel: str, exists: Any, private: Any) -> bool:
        if int(exists):
            self.cache.add_channel(channel, private=private is not None)
        return bool(int(exists))

    def grant(self, channel: str, user_id: int, can_invite: bool) -> Pending:
        old = self.cache.grant_of(channel, user_id)
        self._cache_grant(channel, user_id, bool(can_invite))
        done = shared(self.redis.call(*schema.grant_command(channel, user_id, can_invite)))
        done.wait(self._grant_written, (channel, user_id, old),
                  {"k": "grant", "c": channel, "u": user_id, "i": int(bool(can_invite))})
        return self._marked(after(done, lambda _: None), archive_schema.grant_entry(channel, user_id))

    def revoke_grant(self, channel: str, user_id: int) -> Pending:
        old = self.cache.grant_of(channel, user_id)
        self._cache_grant(channel, user_id, None)
        done = shared(self.redis.call(*schema.revoke_grant_command(channel, user_id)))
        done.wait(self._grant_written, (channel, user_id, old), {"k": "grant", "c": channel, "u": user_id, "i": None})
        return self._marked(after(done, lambda removed: bool(int(removed))),
                            archive_schema.revoked_grant_entry(channel, user_id))

    def grant_of(self, channel: str, user_id: int) -> bool | None:
        return self.cache.grant_of(channel, user_id)

    def confirm_grant(self, channel: str, user_id: int) -> Pending:
        """Read the user's grant from Redis into the cache (a "no" may be stale)."""
        read = self._with_channel(channel, lambda: self.redis.call(*schema.grant_of_command(channel, user_id)))
        return after(read, lambda reply: self._cache_grant(channel, user_id, None if reply is None else reply == b"1"))

    def _cache_grant(self, channel: str, user_id: int, can_invite: bool | None) -> None:
        if self.cache.channel_exists(channel):      # else read when needed (confirm_grant)
            self.cache.set_grant(channel, user_id, can_invite)

    def _grant_written(self, before: tuple, change: Change, ok: bool, value: Any) -> None:
        if ok:
            self._publish(change)
        else:                                       # Redis refused: the cache goes back
            self._cache_grant(*before)

    # -- the change feed -------------------------------------------------------
    def _publish(self, change: Change) -> None:
        if self.on_change is not None:
            self.on_change(change)

    def apply_change(self, change: Change) -> None:
        """Another node changed a name, a membership, a channel or a grant: update
        the cache. Names
        of users this node never saw are not kept (``confirm_user`` reads them)."""
        cache = self.cache
        kind = change.get("k")
        if kind == "name":
            user_id = change["u"]
            if cache.user_exists(user_id):
                cache.set_user_name(user_id, change["name"])
        elif kind == "epoch":
            self._learn_epoch(change["u"], change["e"])
        elif kind == "channel":
            self._learn_channel(change["c"], bool(change["pv"]), change["u"])
        elif kind == "grant":
            can_invite = change["i"]
            self._cache_grant(change["c"], change["u"], None if can_invite is None else bool(can_invite))
        elif kind == "drop":
            cache.delete_channel(change["c"])
        elif kind == "member":
            channel, user_id, push = change["c"], change["u"], change["p"]
            if push is None:
                cache.add_channel(channel)
                cache.unsubscribe(channel, user_id)
            else:
                cache.subscribe(channel, user_id, bool(push))

    # -- messages --------------------------------------------------------------
    def append_channel_message(self, channel: str, msg: Message) -> Pending:
        if self.archive is None:
            command = schema.append_channel_command(channel, msg, now_ms(), self.retention)
            return after(self.redis.call(*command), lambda seq: _set_seq(msg, seq))
        appended = self._append_kept(CHANNEL, channel, schema.channel_keys(channel), msg)
        entry = archive_schema.conversation_entry(conversation_key(CHANNEL, channel))
        return after(appended, lambda seq: after(self._mark_soon(entry), lambda _: _set_seq(msg, seq)))

    def append_user_message(self, sender_id: int, receiver_id: int, msg: Message) -> Pending:
        """Room held in the receiver's mailbox first (a full one refuses: StoreRefusal
        ``mailbox_full``, nothing stored, no seq taken), then the pair's history
        (which gives the seq), then the receiver's mailbox copy (with it), in the
        held room; settled after all (docs/redis.md)."""
        quotas = self.quotas
        if not (quotas.max_mailbox or quotas.max_mailbox_bytes):
            return self._append_direct(sender_id, receiver_id, msg, "")
        size = schema.hold_size(msg)
        hold = schema.hold_of(msg, size)
        held = self.redis.call(*schema.mailbox_hold_command(
            receiver_id, hold, size, now_ms(), quotas.max_mailbox, quotas.max_mailbox_bytes))
        return after(held, lambda reply: self._held(sender_id, receiver_id, msg, hold, reply))

    def _held(self, sender_id: int, receiver_id: int, msg: Message, hold: str, reply: Any) -> Pending:
        refusal = schema.mailbox_refusal(reply, self.quotas)
        if refusal is not None:
            raise refusal
        return self._append_direct(sender_id, receiver_id, msg, hold)

    def _append_direct(self, sender_id: int, receiver_id: int, msg: Message, hold: str) -> Pending:
        if self.archive is None:
            command = schema.append_pair_command(sender_id, receiver_id, msg, now_ms(), self.retention)
            appended = self.redis.call(*command)
        else:
            pair = pair_key(sender_id, receiver_id)
            appended = self._append_kept(USER, pair, schema.pair_keys(*pair), msg)
        if hold:
            relayed = Pending()
            appended.wait(self._release_if_failed, relayed, (receiver_id, hold))
            appended = relayed
        return after(appended, lambda seq: self._to_mailbox(receiver_id, msg, seq, hold, sender_id))

    def _release_if_failed(self, result: Pending, held: tuple[int, str], ok: bool, value: Any) -> None:
        if not ok:      # the room goes back now (else when the hold's deadline passes)
            self.redis.call(*schema.mailbox_release_command(*held))
        result.settle(ok, value)

    def _to_mailbox(self, receiver_id: int, msg: Message, seq: int, hold: str, sender_id: int) -> Pending:
        _set_seq(msg, seq)
        added = self.redis.call(*schema.mailbox_add_command(receiver_id, msg, hold))
        if self.archive is not None:    # the mark with the mailbox step: no round trip more
            entry = archive_schema.conversation_entry(conversation_key(USER, (sender_id, receiver_id)))
            added = gather([added, self._mark_soon(entry)])
        return after(added, lambda _: seq)

    # -- the archive tier (--archive) --------------------------------------------
    def _append_kept(self, kind: HistoryKind, key: Any, keys: schema.ConversationKeys, msg: Message) -> Pending:
        """APPEND_KEPT; on NEEDS_SEQ the conversation's seq is restored from the archive
        first and the append sent again (once). Settles with the seq."""
        generation = self.generation if kind == USER else None
        command = append_kept_command(keys, msg, now_ms(), self.retention, self.archive_kinds, generation)
        return after(self.redis.call(*command), lambda seq: self._restore_if_needed(kind, key, command, seq))

    def _restore_if_needed(self, kind: HistoryKind, key: Any, command: tuple, seq: Any) -> Any:
        if int(seq) != NEEDS_SEQ:
            return int(seq)
        if kind == USER:        # a pair's NEEDS_SEQ with the marker given: the marker is gone
            self.generation_lost()
        restored = self.restore_conversation(kind, key)
        return after(restored, lambda known: self._append_restored(kind, key, command, known))

    def restore_conversation(self, kind: HistoryKind, key: Any) -> Pending:
        """A conversation whose seq Redis lost, back from the archive
        (zim.nodes.refill.restore_conversation): settles True, or False if the
        archive does not know it. Callers that find it missing at once share one
        restore (one read of PostgreSQL)."""
        restoring = self._restoring
        restored = restoring.get(key)
        if restored is None:
            restoring[key] = restored = shared(refill.restore_conversation(self, kind, key))
            restored.wait(_forget_restore, restoring, key)
        return restored

    def generation_lost(self) -> None:
        """Redis no longer holds the generation marker: it lost its data, and no
        node sets the marker again, so stop offering it (once, said in the log)."""
        if self.generation is not None:
            self.generation = None
            log.warning("Redis no longer holds the archive's generation marker: it lost its data. New "
                        "conversations need PostgreSQL from now on, and fail while it is down (docs/redis.md)")

    def _append_restored(self, kind: HistoryKind, key: Any, command: tuple, known: bool) -> Pending:
        if not known:
            raise StoreRefusal("not_found", f"no channel {key} (not in the archive either)")
        return after(self.redis.call(*command), _checked_seq)

    def _mark(self, *entries: str) -> Pending:
        now = now_ms()
        marks = [self.redis.call(*mark_command(entry, now)) for entry in entries]
        return marks[0] if len(marks) == 1 else gather(marks)

    def _mark_soon(self, entry: str) -> Pending:
        """A conversation's mark, sent at the loop's next pass with every other mark of it
        asked for in this one: one MARK for a busy conversation's many messages. Each asker's
        append was answered before it asked, so the MARK runs after all of them in Redis."""
        due = self._marks_due
        mark = due.get(entry)
        if mark is None:
            due[entry] = mark = Shared()
            if self._mark_timer is None:
                self._mark_timer = self.redis.reactor.timer(self._send_marks)
            if len(due) == 1:
                self._mark_timer.set(0)     # a deadline passed already: the next pass
        return mark

    def _send_marks(self) -> None:
        due, self._marks_due = self._marks_due, {}
        now = now_ms()
        for entry, mark in due.items():
            self.redis.call(*mark_command(entry, now)).wait(relay, mark, None)

    def _marked(self, result: Any, *entries: str) -> Any:
        """``result`` (a Pending or a value), settled only once ``entries`` are marked for
        the archiver too (after it succeeded); ``result`` itself without --archive."""
        if self.archive is None:
            return result
        if not isinstance(result, Pending):
            return after(self._mark(*entries), lambda _: result)
        return after(result, lambda value: after(self._mark(*entries), lambda _: value))

    def history(self, kind: HistoryKind, key: Union[ChannelKey, PairKey],
                before_seq: int | None, limit: int) -> Pending:
        if kind == CHANNEL:
            keys = schema.channel_keys(key)  # type: ignore[arg-type]
        elif kind == USER:
            keys = schema.pair_keys(*key)  # type: ignore[misc]
        else:
            raise ValueError(f"unknown history kind {kind!r}")
        if self.archive is not None and (kind != CHANNEL or may_archive_channels(self.archive_kinds)):
            return tiered_history(self, kind, key, keys, before_seq, limit)
        return after(self.redis.call(*schema.history_command(keys, before_seq, limit)),
                     lambda reply: schema.parse_history(reply, limit))

    # -- mailboxes -------------------------------------------------------------
    def mailbox_pull(self, user_id: int, limit: int) -> Pending:
        pulled = after(self.redis.call(*schema.mailbox_pull_command(user_id, limit)), schema.parse_mailbox)
        written = self._user_writes.get(user_id)
        # a login's mailbox is answered only once its user (or new name) is stored
        return pulled if written is None else both(written, pulled)

    def mailbox_ack(self, user_id: int, ids: Iterable[str]) -> Pending | None:
        command = schema.mailbox_ack_command(user_id, ids)
        return None if command is None else after(self.redis.call(*command), lambda _: None)

    def close(self) -> None:
        """Nothing to flush: every call was answered by Redis or failed."""


def _found_private(channel: str) -> StoreRefusal:
    return StoreRefusal("forbidden", f"{channel} is a private channel (made a moment ago on another node)")


def _forget_restore(restoring: dict, key: Any, ok: bool, value: Any) -> None:
    restoring.pop(key, None)


def _checked_seq(seq: Any) -> int:
    if int(seq) == NEEDS_SEQ:       # lost again between the restore and the append
        raise RuntimeError("the conversation's seq is missing in redis again: retry")
    return int(seq)


def _then(first: Pending, second: Pending) -> Pending:
    """``first``'s value once both succeeded."""
    return after(second, lambda _: first)


def _set_seq(msg: Message, seq: int) -> int:
    msg["seq"] = seq
    return seq


def _pairs(reply: Any) -> Iterable[tuple[bytes, bytes]]:
    """A HGETALL reply's (field, value) pairs: hiredis gives a flat list."""
    if isinstance(reply, dict):
        return reply.items()
    return zip(reply[0::2], reply[1::2])
