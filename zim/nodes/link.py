"""The connection from a node to Redis, served by the reactor without blocking.

``RedisLink`` owns one non-blocking TCP socket to Redis. Commands are packed by
hiredis (``pack_command``) and replies parsed by ``hiredis.Reader``, both in C;
everything else (when to write, which call a reply belongs to) is here, run
from the reactor loop. Why a socket in the loop rather than redis-py in a
thread: docs/architecture.md, "Redis: how a node talks to it".

- ``call(*command)`` and ``pipeline([command, ...])`` return a
  ``zim.storage.store.Pending``, so handlers wait on it with ``ctx.later`` like
  on a store result. Results settle in the order of the calls, from the loop.
  ``ok=True`` carries the reply (bytes, int, list...; a pipeline: the list of
  replies); ``ok=False`` a reason (str): Redis answered an error, or the
  connection was lost before the reply came, so a handler answers ``internal``
  and never acknowledges what Redis may not have.
- Each connection starts with a handshake (AUTH and SELECT when the URL asks
  for them, else PING): the link is ``up`` once Redis has answered it.
- A lost connection (closed, reset, a protocol error, or no reply for
  ``reply_timeout`` seconds while calls wait) fails every call waiting on it;
  while the link is down new calls fail at once; it reconnects by itself after
  ``backoff_delay(failures)`` seconds (doubling, capped).
- The reactor watches one descriptor for the link: an epoll set of its own
  holding the socket (edge-triggered, in and out), so the link sees
  writability and connect completion without any change to the reactor.
  Deadlines (reconnect, reply timeout) use a reactor timer (``Reactor.timer``).
- Commands queued while the link handles a wake-up (a result's callback that
  calls again) leave in one ``send`` at its end, as do those of a pipeline.

Pub/sub: ``SubscriberLink`` is the same socket machinery in RESP2 subscribed
mode for shard channels (SSUBSCRIBE): no call waits on it, every reply is a
confirmation or a message (``RedisLink``'s ``on_push`` hook), and it subscribes
again to its channels after every reconnect. ``zim.nodes.client`` puts command
links and subscriber links together behind one API, on one server or a cluster.
"""
from __future__ import annotations

import errno
import logging
import select
import socket
from collections import deque
from typing import Any, Callable, Iterable, Sequence

import hiredis
from redis.crc import key_slot

from zim._core import Reactor, Timer
from zim.backoff import FIRST_BACKOFF, MAX_BACKOFF
from zim.pending import Pending
from zim.servicelink import CONNECTING, UP, ServiceLink

log = logging.getLogger("zim.nodes")

Command = Sequence[Any]     # ("SET", "key", b"value"): str, bytes, int or float each


REPLY_TIMEOUT = 5.0         # seconds without any reply while calls wait: the link is dead
READ_SIZE = 256 * 1024

_MORE = object()            # hiredis.Reader's answer when a reply is still incomplete
_EVENTS = select.EPOLLIN | select.EPOLLOUT | select.EPOLLRDHUP | select.EPOLLET


def parse_redis_url(url: str) -> dict[str, Any]:
    """``redis://[[USER]:PASSWORD@]HOST[:PORT][/DB]`` as RedisLink's arguments
    (host, port, db, password, username), with redis-py's parser; ValueError
    for other schemes (unix sockets, TLS)."""
    from redis.connection import parse_url
    parsed = parse_url(url)
    if "path" in parsed or parsed.get("connection_class") is not None:
        raise ValueError("only redis://HOST:PORT/DB URLs are supported")
    return {"host": parsed.get("host", "127.0.0.1"), "port": int(parsed.get("port", 6379)),
            "db": int(parsed.get("db", 0)), "password": parsed.get("password"),
            "username": parsed.get("username")}


class PipelineResult(Pending):
    """The replies of a pipeline, gathered until the last one has come."""

    __slots__ = ("expected", "replies")

    def __init__(self, expected: int) -> None:
        super().__init__()
        self.expected = expected
        self.replies: list = []


class _Handshake(Pending):
    """A command sent first on every connection (AUTH, SELECT, PING): the link is
    up once Redis has answered the last one; if Redis refuses one, the connection
    is useless and is dropped."""

    __slots__ = ("link", "last")

    def __init__(self, link: "RedisLink", last: bool) -> None:
        super().__init__()
        self.link = link
        self.last = last

    def settle(self, ok: bool, value: Any) -> None:
        if self.link.state is not CONNECTING:
            return
        if not ok:
            self.link._lost(f"handshake refused: {value}")
        elif self.last:
            self.link._up()


class RedisLink(ServiceLink):
    """A connection to one Redis, served by ``reactor``; see the module docstring.

    It starts connecting at once; ``state`` is ``"connecting"``, ``"up"`` (Redis
    has answered this connection's handshake: AUTH and SELECT when asked for,
    else a PING), ``"down"`` (waiting to reconnect) or ``"closed"``.
    ``on_state(state)``, if given, learns every change to ``"up"`` or ``"down"``.
    Calls made while connecting are sent after the handshake (or fail with the
    attempt); calls made while down fail at once. ``on_push(reply)``, if given,
    gets every reply that no call waits for (a subscribed connection's
    confirmations and messages); without it such a reply is a protocol error.
    """

    kind = "redis"
    log = logging.getLogger("zim.nodes")

    def __init__(self, reactor: Reactor, host: str = "127.0.0.1", port: int = 6379, db: int = 0,
                 password: str | None = None, username: str | None = None, *,
                 reply_timeout: float = REPLY_TIMEOUT, first_backoff: float = FIRST_BACKOFF,
                 max_backoff: float = MAX_BACKOFF,
                 on_state: Callable[[str], None] | None = None,
                 on_push: Callable[[Any], None] | None = None) -> None:
        self.address = (host, port)
        self.on_push = on_push
        self._handshake = self._handshake_commands(db, username, password)
        self._sock: socket.socket | None = None
        self._connected = False         # the socket is connected: bytes may be sent
        self._reader = hiredis.Reader(notEnoughData=_MORE)
        self._waiting: deque[Pending] = deque()     # sent or queued, oldest first
        self._out = bytearray()         # packed commands the socket has not taken
        self._handling = False          # in a wake-up: hold sends until its end
        super().__init__(reactor, reply_timeout=reply_timeout, first_backoff=first_backoff,
                         max_backoff=max_backoff, on_state=on_state)

    @classmethod
    def from_url(cls, reactor: Reactor, url: str, **options: Any) -> "RedisLink":
        """A link to ``redis://[[USER]:PASSWORD@]HOST[:PORT][/DB]`` (redis-py's parser)."""
        return cls(reactor, **parse_redis_url(url), **options)

    @staticmethod
    def _handshake_commands(db: int, username: str | None, password: str | None) -> list[tuple]:
        commands = []
        if password is not None:
            commands.append(("AUTH", username, password) if username else ("AUTH", password))
        if db:
            commands.append(("SELECT", db))
        return commands or [("PING",)]

    # -- calls ---------------------------------------------------------------
    def call(self, *command: Any) -> Pending:
        """Send one command; the Pending settles with its reply."""
        pending = Pending()
        if self.state is UP or self.state is CONNECTING:
            self._waiting.append(pending)
            self._send(hiredis.pack_command(command))
        else:
            pending.settle(False, f"redis link {self.state}")
        return pending

    def pipeline(self, commands: Iterable[Command]) -> Pending:
        """Send several commands in one write; the Pending settles with the list of
        their replies, or ok=False with the first error Redis answered (the other
        commands ran: this is not a transaction; wrap them in MULTI/EXEC for one)."""
        packed = [hiredis.pack_command(tuple(command)) for command in commands]
        if not packed:
            raise ValueError("an empty pipeline (it would have nothing to settle in order with)")
        result = PipelineResult(len(packed))
        if self.state is UP or self.state is CONNECTING:
            self._waiting.append(result)
            self._send(b"".join(packed))
        else:
            result.settle(False, f"redis link {self.state}")
        return result

    @property
    def waiting(self) -> int:
        """Calls sent (or queued) and not answered yet."""
        return len(self._waiting)

    @property
    def label(self) -> str:
        return f"{self.kind} {self.address[0]}:{self.address[1]}"

    def _awaiting_answers(self) -> bool:
        return bool(self._waiting)

    def _fail_waiting(self, reason: str) -> None:
        # taken first: a callback may call again (and fail at once, the link being down)
        waiting, self._waiting = self._waiting, deque()
        for pending in waiting:
            pending.settle(False, reason)

    # -- the socket ------------------------------------------------------------
    def _connect(self) -> None:
        self._start_connecting()
        try:
            sock = socket.getaddrinfo(*self.address, type=socket.SOCK_STREAM)[0]
            family, kind, proto, _, address = sock
            self._sock = socket.socket(family, kind | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC, proto)
            self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            code = self._sock.connect_ex(address)
            if code not in (0, errno.EINPROGRESS):
                raise OSError(code, errno.errorcode.get(code, str(code)))
            self._poller.register(self._sock.fileno(), _EVENTS)
        except OSError as exc:
            self._lost(f"cannot connect to {self.address[0]}:{self.address[1]}: {exc}")
            return
        self._arm_stall_check()
        for number, command in enumerate(self._handshake, 1):
            self._waiting.append(_Handshake(self, last=number == len(self._handshake)))
            self._out += hiredis.pack_command(command)
        # the connect's completion comes as EPOLLOUT (then _on_ready sends _out)

    def _send(self, packed: bytes) -> None:
        if self._out or self._handling or not self._connected:
            self._out += packed
            return
        try:
            sent = self._sock.send(packed)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            self._lost(f"send failed: {exc}")
            return
        if sent < len(packed):      # the rest goes when EPOLLOUT says there is room
            self._out += memoryview(packed)[sent:]

    def _flush(self) -> None:
        out = self._out
        while out and self._connected:
            try:
                sent = self._sock.send(out)
            except BlockingIOError:
                return
            except OSError as exc:
                self._lost(f"send failed: {exc}")
                return
            del out[:sent]

    def _on_ready(self) -> None:
        """The link's epoll set is readable: the socket connected, has replies,
        has room again, or broke."""
        sock = self._sock
        self._poller.poll(0)        # empty the set's ready list (edge-triggered items)
        if sock is None:
            return
        self._handling = True
        try:
            if not self._connected:
                code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if code:
                    self._lost(f"cannot connect to {self.address[0]}:{self.address[1]}: "
                               f"{errno.errorcode.get(code, code)}")
                    return
                self._connected = True
            self._read(sock)
        finally:
            self._handling = False
        if self._sock is sock:
            self._flush()

    def _up(self) -> None:
        self._became_up()
        if self.on_state is not None:
            self.on_state(UP)

    def _read(self, sock: socket.socket) -> None:
        reader = self._reader
        waiting = self._waiting
        while True:
            try:
                data = sock.recv(READ_SIZE)
            except BlockingIOError:
                return
            except OSError as exc:
                self._lost(f"receive failed: {exc}")
                return
            if not data:
                self._lost("redis closed the connection")
                return
            reader.feed(data)
            try:
                while True:
                    reply = reader.gets()
                    if reply is _MORE:
                        break
                    self._answers += 1
                    if waiting:
                        self._settle_oldest(waiting, reply)
                    elif self.on_push is not None:
                        self.on_push(reply)
                    else:
                        raise hiredis.ProtocolError("a reply no call waits for")
                    if self._sock is not sock:      # a callback closed the link
                        return
            except hiredis.ProtocolError as exc:
                self._lost(f"protocol error: {exc}")
                return
            if len(data) < READ_SIZE:   # a short read emptied the socket: the next byte is a new edge
                return

    @staticmethod
    def _settle_oldest(waiting: deque, reply: Any) -> None:
        oldest = waiting[0]
        if type(oldest) is PipelineResult:
            oldest.replies.append(reply)
            if len(oldest.replies) < oldest.expected:
                return
            waiting.popleft()
            errors = [r for r in oldest.replies if isinstance(r, hiredis.ReplyError)]
            if errors:
                oldest.settle(False, str(errors[0]))
            else:
                oldest.settle(True, oldest.replies)
            return
        waiting.popleft()
        if isinstance(reply, hiredis.ReplyError):
            oldest.settle(False, str(reply))
        else:
            oldest.settle(True, reply)

    # -- failures and deadlines ---------------------------------------------------
    def _drop_connection(self) -> None:
        sock, self._sock = self._sock, None
        self._connected = False
        if sock is not None:
            try:
                self._poller.unregister(sock.fileno())
            except OSError:
                pass
            sock.close()
        self._out.clear()
        self._reader = hiredis.Reader(notEnoughData=_MORE)

# ---------------------------------------------------------------- subscribed mode

SUBSCRIBE_BATCH = 1000      # channels per SSUBSCRIBE / SUNSUBSCRIBE command


def as_bytes(value: Any) -> bytes:
    """A key or channel as Redis receives it (str as UTF-8, numbers as text)."""
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    return str(value).encode()


class SubscriberLink(RedisLink):
    """A connection in RESP2 subscribed mode for shard channels (SSUBSCRIBE).

    ``subscribe(channels)`` and ``unsubscribe(channels)`` change the set of
    channels this connection wants (``wanted``). The commands leave at the next
    pass of the loop, all of that pass's changes in one write, channels of one
    slot batched per command (one SSUBSCRIBE may only name channels of one slot
    on a cluster). After every reconnect the link subscribes again to all of
    ``wanted``: messages published while it was down are lost (pub/sub is
    at-most-once).

    Replies are pushes, no call waits on them (so the reply-timeout stall check
    never trips here): ``["ssubscribe", channel, n]`` marks ``channel`` as
    ``confirmed``; ``["smessage", channel, data]`` goes to
    ``on_message(channel, data)`` if the channel is still wanted (a message
    already on its way when the caller unsubscribed is dropped);
    ``["sunsubscribe", channel, n]`` that nobody asked for (the server dropped
    the channel: its slot moved to another master) goes to
    ``on_dropped(channel)``; an error reply (MOVED for a channel whose slot is
    elsewhere) to ``on_error(text)``.
    """

    def __init__(self, reactor: Reactor, host: str = "127.0.0.1", port: int = 6379, db: int = 0,
                 password: str | None = None, username: str | None = None, *,
                 on_message: Callable[[bytes, bytes], None] | None = None,
                 on_dropped: Callable[[bytes], None] | None = None,
                 on_error: Callable[[str], None] | None = None, **options: Any) -> None:
        self.on_message = on_message
        self.on_dropped = on_dropped
        self.on_error = on_error
        self.wanted: set[bytes] = set()
        self.confirmed: set[bytes] = set()      # confirmed on the current connection
        self._sent: set[bytes] = set()          # SSUBSCRIBEd on it, no SUNSUBSCRIBE since
        self._leaving: dict[bytes, int] = {}    # SUNSUBSCRIBEs sent and not confirmed yet
        self._changed: set[bytes] = set()       # touched since the last flush
        self._flush_armed = False
        self._flush_alarm: Timer | None = None
        super().__init__(reactor, host, port, db, password, username, on_push=self._on_push, **options)
        try:
            self._flush_alarm = reactor.timer(self._flush_subscriptions)
        except BaseException:
            self.close()
            raise

    def call(self, *command: Any) -> Pending:
        raise TypeError("a subscriber link takes no calls (its replies are pushes)")

    def pipeline(self, commands: Iterable[Command]) -> Pending:
        raise TypeError("a subscriber link takes no calls (its replies are pushes)")

    def subscribe(self, channels: Iterable[str | bytes]) -> None:
        """Want these channels (already wanted ones: nothing happens)."""
        for channel in map(as_bytes, channels):
            if channel not in self.wanted:
                self.wanted.add(channel)
                self._changed.add(channel)
        self._arm_flush()

    def unsubscribe(self, channels: Iterable[str | bytes]) -> None:
        """Stop wanting these channels: their messages are no longer delivered, from now."""
        for channel in map(as_bytes, channels):
            if channel in self.wanted:
                self.wanted.discard(channel)
                self._changed.add(channel)
        self._arm_flush()

    def forget(self, channels: Iterable[bytes]) -> None:
        """Stop wanting these channels without telling the server: it no longer
        holds them (it answered MOVED, or dropped them with their slot)."""
        for channel in channels:
            self.wanted.discard(channel)
            self._sent.discard(channel)
            self.confirmed.discard(channel)
            self._changed.discard(channel)

    def close(self) -> None:
        super().close()
        if self._flush_alarm is not None:
            self._flush_alarm.close()

    # -- sending ---------------------------------------------------------------
    def _arm_flush(self) -> None:
        # at the next pass of the loop rather than now: a login subscribing a user
        # to hundreds of channels costs one write
        if self._changed and not self._flush_armed and self.state is UP:
            self._flush_armed = True
            self._flush_alarm.set(0)

    def _flush_subscriptions(self) -> None:
        self._flush_armed = False
        if self.state is not UP:
            return      # _up() sends everything wanted
        joining, leaving = [], []
        for channel in self._changed:
            if channel in self.wanted:
                if channel not in self._sent:
                    joining.append(channel)
            elif channel in self._sent:
                leaving.append(channel)
        self._changed.clear()
        self._sent.update(joining)
        self._sent.difference_update(leaving)
        for channel in leaving:
            self._leaving[channel] = self._leaving.get(channel, 0) + 1
        self._send_by_slot("SSUBSCRIBE", joining)
        self._send_by_slot("SUNSUBSCRIBE", leaving)

    def _send_by_slot(self, command: str, channels: list[bytes]) -> None:
        by_slot: dict[int, list[bytes]] = {}
        for channel in channels:
            by_slot.setdefault(key_slot(channel), []).append(channel)
        packed = [hiredis.pack_command((command, *group[first:first + SUBSCRIBE_BATCH]))
                  for group in by_slot.values() for first in range(0, len(group), SUBSCRIBE_BATCH)]
        if packed:
            self._send(b"".join(packed))

    def _up(self) -> None:
        # a new connection holds no subscription: all of them again (sent with the
        # handshake's wake-up, before anyone learns that the link is up)
        self._sent = set(self.wanted)
        self._changed.clear()
        self._send_by_slot("SSUBSCRIBE", list(self.wanted))
        super()._up()

    def _drop_connection(self) -> None:
        super()._drop_connection()
        self._sent.clear()
        self.confirmed.clear()
        self._leaving.clear()

    # -- receiving -------------------------------------------------------------
    def _on_push(self, reply: Any) -> None:
        if type(reply) is list and len(reply) == 3:
            kind, channel, data = reply
            if kind == b"smessage":
                if channel in self.wanted and self.on_message is not None:
                    try:
                        self.on_message(channel, data)
                    except Exception:  # noqa: BLE001 -- one bad message must not break the link
                        log.exception("on_message failed for a message on %r", channel)
                return
            if kind == b"ssubscribe":
                self.confirmed.add(channel)
                return
            if kind == b"sunsubscribe":
                self.confirmed.discard(channel)
                self._on_sunsubscribe(channel)
                return
        if isinstance(reply, hiredis.ReplyError):
            if self.on_error is not None:
                self.on_error(str(reply))
            else:
                log.warning("redis %s:%d refused a subscription: %s", *self.address, reply)
            return
        log.warning("redis %s:%d: an unexpected push on a subscriber link: %r", *self.address, reply)

    def _on_sunsubscribe(self, channel: bytes) -> None:
        leaving = self._leaving.get(channel, 0)
        if leaving:         # the confirmation of our own SUNSUBSCRIBE
            if leaving == 1:
                del self._leaving[channel]
            else:
                self._leaving[channel] = leaving - 1
            return
        # the server dropped it (its slot went to another master)
        self._sent.discard(channel)
        if channel in self.wanted and self.on_dropped is not None:
            self.on_dropped(channel)
