"""``RedisClient``: everything a node sends to Redis, one API on one server or a cluster.

``open_redis(reactor, url)`` finds out, before the node's loop runs, whether the
server at ``url`` is a Redis Cluster node, loads every Lua script of
``zim.nodes.schema`` on every master, and returns a ``SingleRedis`` or a
``ClusterRedis``. Both are served by the reactor (``RedisLink`` and
``SubscriberLink``, zim/nodes/link.py): one command link and one subscriber
link per master.

- ``call`` and ``pipeline`` return a ``Pending`` (``ctx.later`` waits on it).
  On a cluster a command goes to the master of its first key's slot
  (``command_slot``); a pipeline's keys must share one slot. A reply that
  says "try again elsewhere or otherwise" is followed before the Pending
  settles: NOSCRIPT (an EVALSHA whose script a restarted Redis forgot) is
  sent again as EVAL; MOVED updates the slot's owner (and the whole slot map
  is read again with CLUSTER SLOTS, in the background) and resends; ASK sends
  ASKING and the command to the named master, once. At most
  ``MAX_REDIRECTS`` such retries per command.
- Order: calls on one master settle in the order they were made, except a
  retried one, which settles (and runs) after its retry.
- Pub/sub uses shard channels (SSUBSCRIBE / SPUBLISH): a shard channel lives
  on the master of its slot, so a cluster's pub/sub traffic is spread over the
  masters like its keys. ``subscribe`` is remembered and sent again after a
  reconnect; messages published while a subscriber link was down are lost
  (at-most-once; zim stores every message before pushing it, and clients fill
  gaps from history).
"""
from __future__ import annotations

import logging
import time
from typing import Any, Callable, Iterable, Sequence

import hiredis
from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot

from zim._core import Reactor, Timer
from zim.nodes import schema
from zim.nodes.link import RedisLink, SubscriberLink, as_bytes, parse_redis_url
from zim.pending import Pending
from zim.servicelink import DOWN, UP

log = logging.getLogger("zim.nodes")

Command = Sequence[Any]
SlotRange = tuple[int, int, str, int]       # first slot, last slot, master host, master port

START_TIMEOUT = 5.0         # seconds open_redis tries to reach Redis before giving up
START_RETRY = 0.1
MAX_REDIRECTS = 5           # NOSCRIPT, MOVED and ASK retries of one command
REFRESH_WHILE_DOWN = 1.0    # seconds between reads of a cluster's slot map while a master is unreachable

# Commands without a key, sent to any master. Every other command's first key
# is its first argument, except the scripts' (after numkeys). Commands whose
# first key is elsewhere (XREAD ... STREAMS key) are not routed right: zim
# sends none.
KEYLESS = frozenset({
    "PING", "ECHO", "PUBLISH", "SCRIPT", "INFO", "CLUSTER", "TIME", "CONFIG", "CLIENT",
    "COMMAND", "FUNCTION", "DBSIZE", "FLUSHALL", "FLUSHDB", "WAIT", "ASKING", "READONLY",
    "READWRITE", "LASTSAVE", "MULTI", "EXEC", "DISCARD", "RANDOMKEY", "KEYS", "SCAN", "HELLO",
    "AUTH", "SELECT", "PUBSUB"})
NUMKEYS_COMMANDS = frozenset({"EVAL", "EVALSHA", "EVAL_RO", "EVALSHA_RO", "FCALL", "FCALL_RO"})


# ---------------------------------------------------------------- routing (pure)


def command_name(command: Command) -> str:
    """The command's name, upper case."""
    name = command[0]
    return (name.decode() if isinstance(name, (bytes, bytearray)) else str(name)).upper()


def command_slot(command: Command) -> int | None:
    """The hash slot of the command's first key, or None for a keyless command."""
    name = command_name(command)
    if name in NUMKEYS_COMMANDS:
        if len(command) > 3 and int(command[2]) > 0:
            return key_slot(as_bytes(command[3]))
        return None
    if name in KEYLESS or len(command) < 2:
        return None
    return key_slot(as_bytes(command[1]))


def pipeline_slot(commands: Iterable[Command]) -> int | None:
    """The one slot of a pipeline's keys (None: no keys); ValueError when they
    are in several slots (a cluster could not run them on one master)."""
    slots = {command_slot(command) for command in commands}
    slots.discard(None)
    if len(slots) > 1:
        raise ValueError(f"a pipeline's keys must share one hash slot, these use {sorted(slots)}")
    return slots.pop() if slots else None


def parse_redirect(error: str) -> tuple[int, str, int]:
    """(slot, host, port) of a ``MOVED <slot> <host>:<port>`` or ``ASK ...``
    error; host is "" when Redis does not know the master's address."""
    _, slot, address = error.split(" ", 2)
    host, _, port = address.rpartition(":")
    return int(slot), host, int(port)


def parse_cluster_slots(reply: list, default_host: str) -> list[SlotRange]:
    """The slot ranges of a CLUSTER SLOTS reply and their masters; a master
    whose host Redis does not know ("" or "?") is taken to be on ``default_host``."""
    ranges = []
    for entry in reply:
        first, last, master = entry[0], entry[1], entry[2]
        host = master[0].decode() if isinstance(master[0], bytes) else str(master[0])
        ranges.append((int(first), int(last), host if host not in ("", "?") else default_host,
                       int(master[1])))
    return ranges


# ---------------------------------------------------------------- start


class _NotReady(Exception):
    """Redis answers, but is not ready to be used yet (a cluster without slots)."""


def discover(address: dict[str, Any], timeout: float = START_TIMEOUT) -> list[SlotRange] | None:
    """Ask the server at ``address`` (``parse_redis_url``'s dict), with redis-py
    and blocking: None for a single server, else the cluster's slot ranges.
    Loads every ``schema.SCRIPTS`` on every master. Retries for ``timeout``
    seconds; RuntimeError when Redis cannot be reached in that time or refuses
    (a wrong password, SELECT on a cluster)."""
    import redis

    host, port = address["host"], address["port"]
    deadline = time.monotonic() + timeout
    while True:
        attempt_timeout = max(0.05, min(1.0, deadline - time.monotonic()))
        try:
            return _discover_once(address, attempt_timeout)
        except (redis.AuthenticationError, redis.ResponseError) as exc:
            raise RuntimeError(f"Redis at {host}:{port} refused zim: {exc}") from exc
        except (redis.ConnectionError, redis.TimeoutError, OSError, _NotReady) as exc:
            if time.monotonic() + START_RETRY > deadline:
                raise RuntimeError(f"Redis at {host}:{port} could not be reached within "
                                   f"{timeout:g} s: {exc}") from exc
            time.sleep(START_RETRY)


def _discover_once(address: dict[str, Any], timeout: float) -> list[SlotRange] | None:
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    def connect(host: str, port: int, db: int) -> redis.Redis:
        # no retries of redis-py's own: ``discover`` keeps the deadline
        return redis.Redis(host=host, port=port, db=db, password=address["password"],
                           username=address["username"], socket_timeout=timeout,
                           socket_connect_timeout=timeout, retry=Retry(NoBackoff(), 0))

    entry = connect(address["host"], address["port"], address["db"])
    try:
        if not entry.info("cluster").get("cluster_enabled"):
            _load_scripts(entry)
            return None
        ranges = parse_cluster_slots(entry.execute_command("CLUSTER", "SLOTS"), address["host"])
    finally:
        entry.close()
    if not ranges:
        raise _NotReady("the cluster has no slots assigned yet")
    for host, port in sorted({(host, port) for _, _, host, port in ranges}):
        master = connect(host, port, 0)
        try:
            _load_scripts(master)
        finally:
            master.close()
    return ranges


def _load_scripts(client: Any) -> None:
    for script in schema.SCRIPTS:
        client.script_load(script.source)


def open_redis(reactor: Reactor, url: str, *, start_timeout: float = START_TIMEOUT,
               **link_options: Any) -> "RedisClient":
    """The node's client for ``redis://[[USER]:PASSWORD@]HOST[:PORT][/DB]``.

    Blocks (the node is starting; its loop does not run yet) until Redis answers
    or ``start_timeout`` seconds have passed (RuntimeError); learns whether it is
    a cluster and its slot map, and loads the Lua scripts on every master (see
    ``discover``). ``link_options`` go to every link (``reply_timeout``,
    ``first_backoff``, ``max_backoff``)."""
    address = parse_redis_url(url)
    slot_ranges = discover(address, start_timeout)
    if slot_ranges is None:
        return SingleRedis(reactor, address, **link_options)
    return ClusterRedis(reactor, address, slot_ranges, **link_options)


# ---------------------------------------------------------------- calls in flight


class _Call(Pending):
    """A call that may be sent again (NOSCRIPT, MOVED, ASK) before it settles."""

    __slots__ = ("client", "command", "link", "asking", "tries")

    def __init__(self, client: "RedisClient", command: Command, link: RedisLink) -> None:
        super().__init__()
        self.client = client
        self.command = command
        self.link = link
        self.asking = False     # send ASKING first (an ASK redirect)
        self.tries = 0


class _Batch(Pending):
    """A pipeline whose commands may be sent again, each on its own: ``todo``
    holds (index, command, link, asking, tries) of those still to send; one
    round sends those that go to the same link the same way."""

    __slots__ = ("client", "replies", "todo", "round", "asking")

    def __init__(self, client: "RedisClient", size: int) -> None:
        super().__init__()
        self.client = client
        self.replies: list = [None] * size
        self.todo: list[tuple] = []
        self.round: list[tuple] = []
        self.asking = False


def _call_answered(call: _Call, sent: Any, ok: bool, value: Any) -> None:
    if call.asking:         # sent as [ASKING, command]: the command's own reply
        replies = sent.replies
        if len(replies) < 2:
            call.settle(False, value)       # the link failed
            return
        value = replies[1]
        ok = not isinstance(value, hiredis.ReplyError)
        if not ok:
            value = str(value)
    if ok:
        call.settle(True, value)
        return
    client = call.client
    retry = client._retry(call.command, call.link, call.asking, value) if call.tries < MAX_REDIRECTS else None
    if retry is None:
        call.settle(False, value)
        return
    call.command, call.link, call.asking = retry
    call.tries += 1
    client._send_call(call)


def _batch_answered(batch: _Batch, sent: Any, ok: bool, value: Any) -> None:
    replies = sent.replies
    if len(replies) < sent.expected:
        batch.settle(False, value)          # the link failed
        return
    client = batch.client
    answers = replies[1::2] if batch.asking else replies
    for (index, command, link, asking, tries), reply in zip(batch.round, answers):
        batch.replies[index] = reply
        if isinstance(reply, hiredis.ReplyError) and tries < MAX_REDIRECTS:
            retry = client._retry(command, link, asking, str(reply))
            if retry is not None:
                batch.todo.append((index, *retry, tries + 1))
    if batch.todo:
        client._send_round(batch)
        return
    for reply in batch.replies:
        if isinstance(reply, hiredis.ReplyError):
            batch.settle(False, str(reply))
            return
    batch.settle(True, batch.replies)


# ---------------------------------------------------------------- the client


class _Master:
    """The two connections to one master: commands, and subscriptions."""

    __slots__ = ("address", "link", "subscriber")

    def __init__(self, address: tuple[str, int], link: RedisLink, subscriber: SubscriberLink) -> None:
        self.address = address
        self.link = link
        self.subscriber = subscriber

    def links(self) -> tuple[RedisLink, RedisLink]:
        return self.link, self.subscriber

    def close(self) -> None:
        self.link.close()
        self.subscriber.close()


class RedisClient:
    """What a node uses for everything Redis; see the module docstring.

    ``on_message(channel, data)`` gets every message of a subscribed shard
    channel (bytes, bytes), from the loop. ``on_state(state)`` learns the
    aggregate state: ``"up"`` once every link (commands and subscriptions, of
    every master) is up, ``"down"`` as soon as one of them is lost after that;
    ``up`` tells the same at any time. ``redirects`` counts the MOVED and ASK
    replies calls followed, ``subscription_redirects`` the MOVED replies to
    SSUBSCRIBE (a correct slot map keeps both at 0).
    """

    cluster = False

    def __init__(self, reactor: Reactor, address: dict[str, Any], **link_options: Any) -> None:
        for reserved in ("on_state", "on_push", "on_message"):
            if reserved in link_options:
                raise TypeError(f"{reserved} is the client's own (set it on the client)")
        self.reactor = reactor
        self.on_state: Callable[[str], None] | None = None
        self.redirects = 0
        self.subscription_redirects = 0
        self.closed = False
        self._credentials = {"password": address.get("password"), "username": address.get("username")}
        self._link_options = link_options
        self._on_message: Callable[[bytes, bytes], None] | None = None
        self._reported_up = False

    # -- the API -------------------------------------------------------------------
    def call(self, *command: Any) -> Pending:
        """Send one command to the master of its first key (any master when it
        has none); the Pending settles with its reply, or ok=False with the
        reason (Redis's error, or the link lost or down)."""
        if not command:
            raise ValueError("an empty command")
        call = _Call(self, command, self._command_link(command))
        self._send_call(call)
        return call

    def pipeline(self, commands: Iterable[Command]) -> Pending:
        """Send several commands whose keys share one hash slot (ValueError if
        not) in one write; the Pending settles with the list of their replies, or
        ok=False with the first error (the other commands ran: no transaction).
        A command answered NOSCRIPT, MOVED or ASK is sent again on its own, and
        its reply takes its place in the list."""
        commands = [tuple(command) for command in commands]
        if not commands:
            raise ValueError("an empty pipeline")
        link = self._master_for(pipeline_slot(commands)).link
        batch = _Batch(self, len(commands))
        batch.todo = [(index, command, link, False, 0) for index, command in enumerate(commands)]
        self._send_round(batch)
        return batch

    def publish(self, channel: str, data: bytes) -> Pending:
        """SPUBLISH ``data`` on the shard channel; settles with the number of
        subscribers that got it on that master."""
        return self.call("SPUBLISH", channel, data)

    def subscribe(self, channel: str) -> None:
        """SSUBSCRIBE ``channel`` (sent at the next pass of the loop), and again
        after every reconnect; subscribing twice is one subscription."""
        channel_bytes = as_bytes(channel)
        self._subscriber_of(channel_bytes).subscribe((channel_bytes,))

    def unsubscribe(self, channel: str) -> None:
        """SUNSUBSCRIBE ``channel``: no message of it reaches ``on_message`` from now."""
        channel_bytes = as_bytes(channel)
        self._subscriber_of(channel_bytes).unsubscribe((channel_bytes,))

    def is_subscribed(self, channel: str) -> bool:
        """Whether Redis has confirmed the subscription on the current connection
        (messages published from then on arrive)."""
        channel_bytes = as_bytes(channel)
        return channel_bytes in self._subscriber_of(channel_bytes).confirmed

    @property
    def on_message(self) -> Callable[[bytes, bytes], None] | None:
        return self._on_message

    @on_message.setter
    def on_message(self, callback: Callable[[bytes, bytes], None] | None) -> None:
        self._on_message = callback
        for master in self._all_masters():
            master.subscriber.on_message = callback

    @property
    def up(self) -> bool:
        """Every link of every master is up."""
        return all(link.state is UP for master in self._serving_masters() for link in master.links())

    @property
    def masters(self) -> list[tuple[str, int]]:
        """The (host, port) of every master serving slots."""
        return [master.address for master in self._serving_masters()]

    def masters_up(self) -> dict[str, bool]:
        """``"host:port"`` of every master serving slots -> whether both its links are up."""
        return {f"{master.address[0]}:{master.address[1]}": all(link.state is UP for link in master.links())
                for master in self._serving_masters()}

    def close(self) -> None:
        """Close every link: waiting calls fail, later ones fail at once."""
        self.closed = True
        for master in self._all_masters():
            master.close()

    # -- for subclasses ----------------------------------------------------------------
    def _master_for(self, slot: int | None) -> _Master:
        raise NotImplementedError

    def _command_link(self, command: Command) -> RedisLink:
        return self._master_for(command_slot(command)).link

    def _serving_masters(self) -> Iterable[_Master]:
        raise NotImplementedError

    def _all_masters(self) -> Iterable[_Master]:
        return self._serving_masters()

    def _moved(self, error: str, link: RedisLink) -> RedisLink | None:
        """The link to follow a MOVED error to (None: do not follow)."""
        return None

    def _asked(self, error: str, link: RedisLink) -> RedisLink | None:
        """The link to follow an ASK error to (None: do not follow)."""
        return None

    def _subscriber_of(self, channel: bytes) -> SubscriberLink:
        return self._master_for(key_slot(channel)).subscriber

    def _open_master(self, host: str, port: int, db: int = 0) -> _Master:
        link = RedisLink(self.reactor, host, port, db, **self._credentials, on_state=self._link_state,
                         **self._link_options)
        try:
            subscriber = SubscriberLink(self.reactor, host, port, db, **self._credentials,
                                        on_state=self._link_state, on_message=self._on_message,
                                        **self._link_options)
        except BaseException:
            link.close()
            raise
        master = _Master((host, port), link, subscriber)
        subscriber.on_dropped = lambda channel: self._dropped(master, channel)
        subscriber.on_error = lambda error: self._subscriber_error(master, error)
        return master

    def _dropped(self, master: _Master, channel: bytes) -> None:
        """The server of ``master`` dropped a wanted channel (its slot moved)."""
        log.warning("redis %s:%d dropped the subscription to %r", *master.address, channel)

    def _subscriber_error(self, master: _Master, error: str) -> None:
        log.warning("redis %s:%d refused a subscription: %s", *master.address, error)

    # -- sending and retrying ----------------------------------------------------------
    def _send_call(self, call: _Call) -> None:
        if call.asking:
            sent = call.link.pipeline((("ASKING",), call.command))
            sent.wait(_call_answered, call, sent)
        else:
            call.link.call(*call.command).wait(_call_answered, call, None)

    def _send_round(self, batch: _Batch) -> None:
        _, _, link, asking, _ = batch.todo[0]
        this_round, later = [], []
        for entry in batch.todo:
            (this_round if entry[2] is link and entry[3] == asking else later).append(entry)
        batch.todo, batch.round, batch.asking = later, this_round, asking
        if asking:
            commands = [part for entry in this_round for part in (("ASKING",), entry[1])]
        else:
            commands = [entry[1] for entry in this_round]
        sent = link.pipeline(commands)
        sent.wait(_batch_answered, batch, sent)

    def _retry(self, command: Command, link: RedisLink, asking: bool,
               error: str) -> tuple[Command, RedisLink, bool] | None:
        """How to send ``command`` again after ``error`` (None: it is final)."""
        if schema.is_noscript(error) and command_name(command) == "EVALSHA" \
                and command[1] in schema.Script.registry:
            return schema.eval_fallback(command), link, asking
        if error.startswith("MOVED "):
            target = self._moved(error, link)
            return None if target is None else (command, target, False)
        if error.startswith("ASK "):
            target = self._asked(error, link)
            return None if target is None else (command, target, True)
        return None

    def _link_state(self, _state: str) -> None:
        up = self.up
        if up is self._reported_up or self.closed:
            return
        self._reported_up = up
        if self.on_state is not None:
            self.on_state(UP if up else DOWN)


class SingleRedis(RedisClient):
    """The client of one Redis server (not a cluster): every command on one link."""

    def __init__(self, reactor: Reactor, address: dict[str, Any], **link_options: Any) -> None:
        super().__init__(reactor, address, **link_options)
        self._master = self._open_master(address["host"], address["port"], address["db"])
        self._link = self._master.link

    def call(self, *command: Any) -> Pending:
        # only an EVALSHA may need a second send here (NOSCRIPT): the rest go straight
        if command and command[0] != "EVALSHA" and command_name(command) != "EVALSHA":
            return self._link.call(*command)
        return super().call(*command)

    def _command_link(self, command: Command) -> RedisLink:
        return self._link

    def pipeline(self, commands: Iterable[Command]) -> Pending:
        commands = [tuple(command) for command in commands]
        if commands and not any(command_name(command) == "EVALSHA" for command in commands):
            pipeline_slot(commands)     # the same promise as on a cluster, checked here too
            return self._link.pipeline(commands)
        return super().pipeline(commands)

    def _master_for(self, slot: int | None) -> _Master:
        return self._master

    def _subscriber_of(self, channel: bytes) -> SubscriberLink:
        return self._master.subscriber

    def _serving_masters(self) -> Iterable[_Master]:
        return (self._master,)


class ClusterRedis(RedisClient):
    """The client of a Redis Cluster: a command link and a subscriber link per
    master, a slot map (slot -> master) from CLUSTER SLOTS, corrected by MOVED
    replies and read again after each. While a master cannot be reached (no
    MOVED can come from it) the map is read again every ``REFRESH_WHILE_DOWN``
    seconds through a master that can, so a replica promoted in its place, or
    its slots given to others, are found."""

    cluster = True

    def __init__(self, reactor: Reactor, address: dict[str, Any], slot_ranges: list[SlotRange],
                 **link_options: Any) -> None:
        """``slot_ranges``: (first, last, host, port) per range, as ``discover`` finds them."""
        if address.get("db"):
            raise ValueError("a Redis Cluster has only database 0")
        if not slot_ranges:
            raise ValueError("a cluster client needs the slot map")
        super().__init__(reactor, address, **link_options)
        self._masters: dict[tuple[str, int], _Master] = {}
        self._owner: list[_Master] = []
        self._serving: list[_Master] = []
        self._refreshing = False
        self._refresh_alarm: Timer | None = None
        self._refresh_armed = False
        try:
            self._refresh_alarm = reactor.timer(self._refresh_while_down)
            self._apply_slot_ranges(slot_ranges)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        super().close()
        if self._refresh_alarm is not None:
            self._refresh_alarm.close()

    def _master_for(self, slot: int | None) -> _Master:
        return self._owner[0 if slot is None else slot]

    def _serving_masters(self) -> Iterable[_Master]:
        return self._serving

    def _all_masters(self) -> Iterable[_Master]:
        return list(self._masters.values())

    def _master_at(self, host: str, port: int) -> _Master:
        master = self._masters.get((host, port))
        if master is None:
            master = self._masters[(host, port)] = self._open_master(host, port)
        return master

    # -- the slot map ------------------------------------------------------------------
    def _apply_slot_ranges(self, slot_ranges: list[SlotRange]) -> None:
        """A new slot map: slots it does not cover keep their master (or the first
        one's). Subscriptions follow their channel's slot; masters left without
        slots, calls or channels are closed."""
        owner: list[_Master | None] = [None] * REDIS_CLUSTER_HASH_SLOTS
        for first, last, host, port in slot_ranges:
            master = self._master_at(host, port)
            owner[first:last + 1] = [master] * (last + 1 - first)
        fallback = next(m for m in owner if m is not None) if any(owner) else self._owner[0]
        previous = self._owner or [fallback] * REDIS_CLUSTER_HASH_SLOTS
        self._owner = [mine or before for mine, before in zip(owner, previous)]
        self._serving = list({id(m): m for m in self._owner}.values())
        self._move_misplaced_subscriptions()
        for address, master in list(self._masters.items()):
            if master not in self._serving and not master.link.waiting and not master.subscriber.wanted:
                del self._masters[address]
                master.close()

    def _move_misplaced_subscriptions(self) -> None:
        for master in list(self._masters.values()):
            misplaced = [channel for channel in master.subscriber.wanted
                         if self._owner[key_slot(channel)] is not master]
            if misplaced:
                master.subscriber.unsubscribe(misplaced)
                for channel in misplaced:
                    self._subscriber_of(channel).subscribe((channel,))

    def _refresh_slots(self, via: _Master) -> None:
        """Read the whole slot map again (CLUSTER SLOTS on ``via``: the master that
        just said it owns a slot knows the newest map), one refresh at a time."""
        if self._refreshing or self.closed:
            return
        self._refreshing = True
        via.link.call("CLUSTER", "SLOTS").wait(self._slots_read, via, None)

    def _slots_read(self, via: _Master, _: None, ok: bool, reply: Any) -> None:
        self._refreshing = False
        if self.closed:
            return
        if not ok or not reply:
            log.warning("redis %s:%d: CLUSTER SLOTS failed (%s); the next MOVED tries again",
                        *via.address, reply)
            return
        self._apply_slot_ranges(parse_cluster_slots(reply, via.address[0]))
        self._link_state(UP)        # the set of masters may have changed

    def _link_state(self, state: str) -> None:
        super()._link_state(state)
        if not self.up and not self.closed and not self._refresh_armed:
            self._refresh_armed = True
            self._refresh_alarm.set(time.monotonic_ns() + int(REFRESH_WHILE_DOWN * 1e9))

    def _refresh_while_down(self) -> None:
        self._refresh_armed = False
        if self.closed or self.up:
            return
        reachable = next((m for m in self._masters.values() if m.link.state is UP), None)
        if reachable is not None:
            self._refresh_slots(reachable)
        self._link_state(DOWN)      # again in a while, until every master is up

    def _redirect_target(self, error: str, link: RedisLink) -> tuple[int, _Master]:
        slot, host, port = parse_redirect(error)
        return slot, self._master_at(host or link.address[0], port)

    def _moved(self, error: str, link: RedisLink) -> RedisLink | None:
        self.redirects += 1
        slot, master = self._redirect_target(error, link)
        if self._owner[slot] is not master:
            self._owner[slot] = master
            if master not in self._serving:
                self._serving.append(master)
            self._refresh_slots(master)
        return master.link

    def _asked(self, error: str, link: RedisLink) -> RedisLink | None:
        # a slot being migrated: this once only, the map stays as it is
        self.redirects += 1
        return self._redirect_target(error, link)[1].link

    # -- subscriptions whose slot moved -----------------------------------------------------
    def _dropped(self, master: _Master, channel: bytes) -> None:
        # subscribe where the map says; if that is stale, the answer is a MOVED (below)
        master.subscriber.forget((channel,))
        self._subscriber_of(channel).subscribe((channel,))
        self._refresh_slots(master)

    def _subscriber_error(self, master: _Master, error: str) -> None:
        if not error.startswith("MOVED "):
            super()._subscriber_error(master, error)
            return
        self.subscription_redirects += 1
        slot, owner = self._redirect_target(error, master.link)
        self._owner[slot] = owner
        if owner not in self._serving:
            self._serving.append(owner)
        moving = [channel for channel in master.subscriber.wanted if key_slot(channel) == slot]
        master.subscriber.forget(moving)
        owner.subscriber.subscribe(moving)
        self._refresh_slots(owner)
