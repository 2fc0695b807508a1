"""An asyncio zim client over TCP or WebSocket, built on ``zim.client.codec``.

::

    import asyncio
    from zim.client.aio import connect

    async def main():
        async with await connect("tcp://127.0.0.1:8081", name="alice") as alice:   # or "ws://127.0.0.1:8082/"
            await alice.join("room1")
            await alice.send_channel("room1", "hi")
            async for push in alice.pushes():            # 101 and 102; a 103 comes as its messages
                print(push.conversation, push.seq, push.message["content"])

    asyncio.run(main())

What it does for the application (docs/protocol.md):

- **Requests** carry a seq of their own and ``request`` awaits the answer with that
  seq; an error answer raises ``ZimError`` (``.code``: ``not_found``, ...).
- **Pushes in order, with no hole.** Per conversation (a channel, or the direct
  conversation with one other user: seq numbers each of them 1, 2, 3 ...) the client
  keeps the last seq it delivered (``last_seqs``). A push whose seq is past the
  next one, or a 103 that ``skipped`` messages, is preceded by the missing messages
  read from history (action 5, paging back with ``beforeSeq``); what was delivered
  already is dropped. A conversation is tracked from its first push (or from
  ``last_seqs`` given to the constructor, say saved by an earlier run).
- **Own messages.** The server never pushes a connection its own messages; the
  seqs of this client's sends are skipped when they come back from history. (One
  filled from history before its send's answer arrived is delivered.)
- **Reconnects.** When the connection drops, the client connects again with
  backoff (0.1 s doubling to 5 s, with jitter) and logs in with the newest token
  (each login answers a fresh one: ``client.token``). Memberships are kept by the
  server, so nothing is joined again. It then reads each tracked conversation's
  history past its last seq, and pulls the mailbox (action 7). Requests made while
  the connection is down wait for it; those in flight when it drops raise
  ``Closed``.
- **Mailbox.** Direct messages to this user are acknowledged (action 8) once
  delivered to ``pushes()`` (unless ``auto_ack=False``); after each login the mailbox
  is pulled and acknowledged page by page.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from zim.client.blocking import Closed, ZimError
from zim.client.codec import (Body, DEFAULT_MAX_PACKET, OP_CLOSE, OP_PONG, Packet, ProtocolError, WsDecoder,
                              check_ws_upgrade, decode_body, encode_body, login_body, login_compress, new_ws_key,
                              server_address, split_tcp, tcp_packet, ws_close, ws_frame, ws_packet,
                              ws_upgrade_request)
from zim.protocol import (ACK, HEARTBEAT, HISTORY, LOGIN, PULL, PUSH_CHANNEL_BATCH, PUSH_CHANNEL_MESSAGE,
                          PUSH_USER_MESSAGE, REFRESH_TOKEN, SEND_CHANNEL, SEND_USER, SUBSCRIBE, UNSUBSCRIBE)

__all__ = ["Client", "Closed", "Conversation", "Push", "ZimError", "connect"]

log = logging.getLogger(__name__)
READ_SIZE = 1 << 18
HISTORY_PAGE = 100                  # the most one history request returns (docs/protocol.md, action 5)
Conversation = tuple[str, str]      # ("channel", name) or ("user", the other user's id)


@dataclass(frozen=True)
class Push:
    """One message delivered by ``Client.pushes()``.

    ``action`` is 101 (a direct message) or 102 (a channel message: those of a 103
    batch come one by one as 102). ``filled`` is true for a message read from history
    or the mailbox rather than pushed. Any other push the server sends comes with its
    own action and body as ``message`` and ``conversation`` None.
    """
    action: int
    message: dict
    conversation: Conversation | None = None
    filled: bool = False

    @property
    def seq(self) -> int | None:
        return self.message.get("seq")

    @property
    def content(self) -> Any:
        return self.message.get("content")


# -- transports: whole packets over asyncio streams --------------------------------
class _Connection:
    """A connected stream; ``read()`` returns the next packets, raising Closed at the end."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def _chunk(self) -> bytes:
        try:
            data = await self.reader.read(READ_SIZE)
        except (ConnectionError, OSError) as exc:
            raise Closed(None, str(exc), reset=True) from None
        if not data:
            raise Closed(None, "EOF")
        return data

    def abort(self) -> None:
        """Drop the connection at once (no close frame)."""
        self.writer.transport.abort()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()


class _TcpConnection(_Connection):
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, inflate: bool) -> None:
        super().__init__(reader, writer)
        self.buffer = bytearray()
        self.inflate = inflate          # compressed packets were asked for (seq bit 15: inflated)

    def send(self, action: int, seq: int, payload: bytes) -> None:
        self.writer.write(tcp_packet(action, seq, payload))

    async def read(self) -> list[Packet]:
        while True:
            packets = split_tcp(self.buffer, DEFAULT_MAX_PACKET, self.inflate)
            if packets:
                return packets
            self.buffer += await self._chunk()


class _WsConnection(_Connection):
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        super().__init__(reader, writer)
        self.decoder = WsDecoder(DEFAULT_MAX_PACKET)

    def send(self, action: int, seq: int, payload: bytes) -> None:
        self.writer.write(ws_packet(action, seq, payload))

    async def read(self) -> list[Packet]:
        while True:
            packets = []
            for event in self.decoder.feed(await self._chunk()):
                if event[0] == "packet":
                    packets.append(event[1:])
                elif event[0] == "ping":
                    self.writer.write(ws_frame(OP_PONG, event[1]))
                elif event[0] == "close":
                    with contextlib.suppress(Exception):
                        self.writer.write(ws_close(event[1]) if event[1] else ws_frame(OP_CLOSE))
                    raise Closed(event[1], event[2])
            if packets:
                return packets

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.write(ws_close(1000))
        super().close()


async def _open(url: str, timeout: float, compress: bool) -> _Connection:
    """A connection to ``tcp://HOST:PORT`` or ``ws://HOST:PORT/PATH`` (the WebSocket
    upgrade done); ``compress``: TCP packets with a compressed body are inflated."""
    scheme, host, port, path = server_address(url)
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection(host, port, limit=DEFAULT_MAX_PACKET), timeout)
    if scheme == "tcp":
        return _TcpConnection(reader, writer, compress)
    try:
        key = new_ws_key()
        writer.write(ws_upgrade_request(key, f"{host}:{port}", path))
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
        check_ws_upgrade(head, key)
    except BaseException:
        writer.close()
        raise
    return _WsConnection(reader, writer)


@dataclass
class _Track:
    """What the client knows of one conversation: the last seq delivered, and the
    seqs of its own sends past it (never pushed back to it)."""
    last: int | None = None
    own: set[int] = field(default_factory=set)


_RESYNC = object()      # in the push queue: after a login, fill every tracked conversation, pull the mailbox
_END = object()         # in the delivery queue: the client was closed


class Client:
    """A zim connection that reconnects; use ``connect()`` or ``async with Client(...)``.

    ``url``: ``tcp://HOST:PORT`` or ``ws://HOST:PORT/PATH``. With ``name`` the client
    logs in on start (with ``token``, as that user again; with ``jwt``, the
    application's, as the user it names) and again after every reconnect, with
    the newest zim token. ``last_seqs`` gives conversations to track from a known seq (see
    ``last_seqs``). ``timeout`` bounds connecting and each request; ``heartbeat``
    is the period of action 9 (the server closes idle connections); ``reconnect=False``
    ends ``pushes()`` with ``Closed`` when the connection drops instead.
    ``compress=True`` (TCP only: WebSocket has permessage-deflate) asks for
    compressed packets at every login and inflates them.
    """

    def __init__(self, url: str, name: str | None = None, token: str | None = None, *, jwt: str | None = None,
                 last_seqs: dict[Conversation, int] | None = None, reconnect: bool = True,
                 auto_ack: bool = True, timeout: float = 10.0, heartbeat: float = 60.0,
                 backoff: tuple[float, float] = (0.1, 5.0), compress: bool = False) -> None:
        if compress and server_address(url)[0] != "tcp":
            raise ValueError("compress=True is for tcp:// (WebSocket compresses with permessage-deflate)")
        self.url = url
        self.compress = compress
        self.compressed = False             # the server agreed at the last login
        self.name = name
        self.token = token
        self.jwt = jwt                      # the application's, for the first login; then the token serves
        self.user_id: str | None = None
        self.reconnect = reconnect
        self.auto_ack = auto_ack
        self.timeout = timeout
        self.heartbeat = heartbeat
        self.backoff = backoff
        self.reconnects = 0                 # how many times the connection was made again
        self._tracks = {key: _Track(seq) for key, seq in (last_seqs or {}).items()}
        self._conn: _Connection | None = None
        self._ready = asyncio.Event()       # connected (and logged in, if there is a name)
        self._waiting: dict[int, asyncio.Future] = {}
        self._seq = 0
        self._incoming: asyncio.Queue = asyncio.Queue()     # raw pushes and _RESYNC, in arrival order
        self._delivered: asyncio.Queue = asyncio.Queue()    # Push, an exception, or _END
        self._tasks: set[asyncio.Task] = set()
        self._closing = False
        self._reconnecting = False

    # -- life cycle ----------------------------------------------------------------
    async def start(self) -> "Client":
        """Connect (and log in, with a name); errors of this first attempt are raised."""
        self._spawn(self._dispatch())
        self._spawn(self._heartbeats())
        try:
            await self._connect_once()
        except BaseException:
            await self.close()
            raise
        return self

    async def close(self) -> None:
        """Close the connection and stop; ``pushes()`` ends."""
        if self._closing:
            return
        self._closing = True
        if self._conn is not None:
            self._conn.close()
        self._fail_waiting(Closed(None, "client closed"))
        self._delivered.put_nowait(_END)
        tasks = [task for task in self._tasks if task is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        if tasks:       # bounded: a task that swallowed its cancellation must not hang close()
            await asyncio.wait(tasks, timeout=1.0)

    async def __aenter__(self) -> "Client":
        if not self._tasks and not self._closing:      # not started yet
            await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _spawn(self, coroutine) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _connect_once(self) -> None:
        conn = await _open(self.url, self.timeout, self.compress)
        self._conn = conn
        self._spawn(self._read_loop(conn))
        if self.name is None and self.token is None and self.jwt is None:
            self._ready.set()
        else:
            await self._login(self.name, self.token, self.jwt)

    async def _read_loop(self, conn: _Connection) -> None:
        """Route the connection's packets: answers to their requests, pushes to the queue."""
        try:
            while True:
                for action, seq, raw in await conn.read():
                    body = decode_body(raw)
                    if seq == 0:
                        self._incoming.put_nowait((action, body))
                    else:
                        future = self._waiting.pop(seq, None)
                        if future is not None and not future.done():
                            future.set_result((action, body))
        except (Closed, ProtocolError) as exc:
            reason: Exception = exc
        except asyncio.CancelledError:
            conn.abort()
            raise
        conn.abort()
        if conn is self._conn and not self._closing:
            self._lost(reason)

    def _lost(self, reason: Exception) -> None:
        self._conn = None
        self._ready.clear()
        self._fail_waiting(reason if isinstance(reason, Closed) else Closed(None, str(reason)))
        if self.reconnect:
            if not self._reconnecting:
                self._spawn(self._reconnect_loop())
        else:
            self._delivered.put_nowait(reason)

    def _fail_waiting(self, exc: Exception) -> None:
        waiting, self._waiting = self._waiting, {}
        for future in waiting.values():
            if not future.done():
                future.set_exception(exc)

    async def _reconnect_loop(self) -> None:
        self._reconnecting = True
        try:
            await self._reconnect_until_ready()
        finally:
            self._reconnecting = False

    async def _reconnect_until_ready(self) -> None:
        first, most = self.backoff
        attempt = 0
        while not self._closing:
            await asyncio.sleep(min(most, first * 2 ** attempt) * random.uniform(0.5, 1.0))
            attempt += 1
            try:
                await self._connect_once()
            except ZimError as exc:
                if exc.code in ("unauthorized", "bad_request"):     # this token or name will never do
                    self._delivered.put_nowait(exc)
                    await self.close()
                    return
            except (OSError, asyncio.TimeoutError, ProtocolError, asyncio.IncompleteReadError):
                pass
            if self._ready.is_set():
                self.reconnects += 1
                return
            if self._conn is not None:
                conn, self._conn = self._conn, None
                conn.abort()

    async def _heartbeats(self) -> None:
        while not self._closing:
            await asyncio.sleep(self.heartbeat)
            if self._ready.is_set():
                with contextlib.suppress(ZimError, Closed, asyncio.TimeoutError):
                    await self.request(HEARTBEAT)

    def drop_connection(self) -> None:
        """Drop the connection as a network failure would (the client reconnects)."""
        if self._conn is not None:
            self._conn.abort()

    # -- requests ------------------------------------------------------------------
    def _next_seq(self) -> int:
        while True:
            self._seq = self._seq % 32767 + 1
            if self._seq not in self._waiting:
                return self._seq

    async def _call(self, action: int, body: Body) -> dict:
        """Send on the connection there is now and await the answer; ZimError for an error."""
        conn = self._conn
        if conn is None:
            raise Closed(None, "not connected")
        seq = self._next_seq()
        future = asyncio.get_running_loop().create_future()
        self._waiting[seq] = future
        conn.send(action, seq, encode_body(body))
        try:
            with contextlib.suppress(ConnectionError):     # a drop is the read loop's to see
                await conn.writer.drain()
            got, result = await asyncio.wait_for(future, self.timeout)
        finally:
            self._waiting.pop(seq, None)
        if got != action:
            raise ProtocolError(f"answer of action {got} to a request of action {action}")
        error = result.get("error")
        if error is not None:
            raise ZimError(action, str(error.get("code")), str(error.get("message")))
        return result

    async def request(self, action: int, body: Body = None) -> dict:
        """Send a request once connected (and logged in) and return its answer's body.

        Raises ZimError for an error answer, Closed when the connection drops first,
        ``asyncio.TimeoutError`` past ``timeout`` (waiting for a reconnect included).
        """
        await asyncio.wait_for(self._ready.wait(), self.timeout)
        return await self._call(action, body)

    async def login(self, name: str | None = None, token: str | None = None, *, jwt: str | None = None) -> dict:
        """Action 1 as ``name`` (with ``token``: that user again; with ``jwt``: the user
        the application's JWT names). The client then logs in so after every
        reconnect, with the newest token."""
        return await self._login(name, token, jwt)

    async def _login(self, name: str | None, token: str | None, jwt: str | None = None) -> dict:
        body = login_body(name, None if jwt is not None else token, jwt)
        result = await self._call(LOGIN, login_compress(body) if self.compress else body)
        self.compressed = result.get("compress") == "deflate"
        # a JWT login answers the user's name: the token logins of reconnects need one
        self.name, self.token, self.jwt = result.get("name", name), result["token"], None
        self.user_id = result["id"]
        self._ready.set()
        self._incoming.put_nowait(_RESYNC)
        return result

    async def renew(self) -> dict:
        """Action 10: a fresh token (kept in ``token``)."""
        result = await self.request(REFRESH_TOKEN)
        self.token = result["token"]
        return result

    async def send_user(self, user_id: str, content: str) -> dict:
        """Action 2: a direct message; returns ``{"id", "seq"}``."""
        result = await self.request(SEND_USER, {"receiverId": user_id, "content": content})
        self._sent(("user", user_id), result["seq"])
        return result

    async def send_channel(self, channel: str, content: str) -> dict:
        """Action 4: a message to a channel you are a member of; returns ``{"id", "seq"}``."""
        result = await self.request(SEND_CHANNEL, {"channel": channel, "content": content})
        self._sent(("channel", channel), result["seq"])
        return result

    async def join(self, channel: str, push: bool | None = None) -> dict:
        """Action 3: join (or create) ``channel``; ``push=False``: a member without pushes."""
        body: dict[str, Any] = {"name": channel}
        if push is not None:
            body["push"] = push
        return await self.request(SUBSCRIBE, body)

    async def leave(self, channel: str) -> dict:
        """Action 6: leave ``channel``; it is no longer tracked."""
        result = await self.request(UNSUBSCRIBE, {"name": channel})
        self._tracks.pop(("channel", channel), None)
        return result

    async def history(self, channel: str | None = None, user_id: str | None = None,
                      before_seq: int | None = None, limit: int | None = None) -> dict:
        """Action 5: ``{"messages", "hasMore"}`` of a channel or of the direct conversation
        with ``user_id``: the newest ``limit`` (default 20, at most 100), or those before
        ``before_seq``, oldest first."""
        body: dict[str, Any] = {"channel": channel} if channel is not None else {"userId": user_id}
        if before_seq is not None:
            body["beforeSeq"] = before_seq
        if limit is not None:
            body["limit"] = limit
        return await self.request(HISTORY, body)

    async def pull(self, limit: int | None = None) -> dict:
        """Action 7: ``{"messages", "hasMore"}``, the oldest unacknowledged direct messages."""
        return await self.request(PULL, {} if limit is None else {"limit": limit})

    async def ack(self, ids: list[str]) -> dict:
        """Action 8: remove these messages from the mailbox."""
        return await self.request(ACK, {"ids": list(ids)})

    # -- pushes --------------------------------------------------------------------
    async def pushes(self) -> AsyncIterator[Push]:
        """The messages pushed to this user, in seq order per conversation, with no hole
        and no duplicate. Ends when the client is closed; raises ``Closed`` (without
        reconnect) or the ZimError that stopped the reconnects."""
        while True:
            item = await self._delivered.get()
            if item is _END:
                self._delivered.put_nowait(_END)
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    async def next_push(self, timeout: float | None = None) -> Push:
        """The next message of ``pushes()``; ``asyncio.TimeoutError`` if none comes in time,
        ``Closed`` once the client is closed."""
        iterator = self.pushes()
        try:
            return await asyncio.wait_for(iterator.__anext__(), timeout)
        except StopAsyncIteration:
            raise Closed(None, "client closed") from None
        finally:
            await iterator.aclose()

    @property
    def last_seqs(self) -> dict[Conversation, int]:
        """The last seq delivered per tracked conversation: save it to resume later
        (``Client(..., last_seqs=...)``)."""
        return {key: track.last for key, track in self._tracks.items() if track.last is not None}

    def _key(self, message: dict) -> Conversation:
        if "channel" in message:
            return ("channel", message["channel"])
        sender = message.get("sender", {}).get("id")
        return ("user", message.get("receiverId") if sender == self.user_id else sender)

    def _sent(self, key: Conversation, seq: int) -> None:
        track = self._tracks.get(key) or self._tracks.setdefault(key, _Track())
        if track.last is not None and seq == track.last + 1:
            track.last = seq        # nothing before it is missing: it is the newest seen
        elif track.last is None or seq > track.last:
            track.own.add(seq)

    async def _dispatch(self) -> None:
        """Take pushes in arrival order, fill their holes, deliver them."""
        while not self._closing:    # (not only cancellation: wait_for may swallow it, Python 3.11)
            item = await self._incoming.get()
            try:
                if item is _RESYNC:
                    await self._resync()
                else:
                    await self._on_push(*item)
            except (Closed, asyncio.TimeoutError):
                pass        # the connection dropped: what was not delivered is filled after the reconnect
            except Exception:       # a bug, or a server breaking the protocol: keep delivering the rest
                log.exception("zim client: a push could not be handled: %r", item)

    async def _on_push(self, action: int, body: dict) -> None:
        if action == PUSH_CHANNEL_BATCH:
            messages = [dict(message, channel=body["channel"]) for message in body.get("messages", [])]
            skipped = body.get("skipped", 0)
            key: Conversation = ("channel", body["channel"])
        elif action in (PUSH_USER_MESSAGE, PUSH_CHANNEL_MESSAGE):
            messages, skipped, key = [body], 0, self._key(body)
        else:
            self._delivered.put_nowait(Push(action, body))
            return
        track = self._tracks.setdefault(key, _Track())
        if messages:
            first = messages[0]["seq"]
            after = track.last
            if after is None:       # not tracked yet: only what the batch says it skipped
                after = first - 1 - skipped - len([seq for seq in track.own if seq < first])
            while after + 1 in track.own:
                after += 1
            missing = await self._fetch(key, after, first) if after < first - 1 else []
        elif track.last is not None:
            missing = await self._fetch(key, track.last, None)
        else:
            page = await self._history_page(key, None, min(HISTORY_PAGE, skipped + len(track.own)))
            missing = page["messages"]
        self._deliver(key, missing, True)
        self._deliver(key, messages, False)

    async def _history_page(self, key: Conversation, before: int | None, limit: int) -> dict:
        kind, name = key
        return await self.history(name if kind == "channel" else None, name if kind == "user" else None,
                                  before, limit)

    async def _fetch(self, key: Conversation, after: int, before: int | None) -> list[dict]:
        """The messages of ``key`` with ``after`` < seq < ``before`` (None: the newest),
        read from history backwards; [] if history refuses (a channel left meanwhile)."""
        found: list[dict] = []
        while before is None or before - after > 1:
            limit = HISTORY_PAGE if before is None else min(HISTORY_PAGE, before - after - 1)
            try:
                page = await self._history_page(key, before, limit)
            except ZimError:
                return found
            messages = [message for message in page["messages"] if message["seq"] > after]
            if key[0] == "channel":
                messages = [dict(message, channel=key[1]) for message in messages]
            found[:0] = messages
            if not page.get("hasMore") or len(messages) < len(page["messages"]) or not messages:
                break
            before = messages[0]["seq"]
        return found

    def _deliver(self, key: Conversation, messages: list[dict], filled: bool) -> None:
        """Deliver the messages past the conversation's last seq, in seq order; acknowledge
        the direct ones (duplicates included: they may still be in the mailbox)."""
        track = self._tracks.setdefault(key, _Track())
        acks = []
        for message in sorted(messages, key=lambda message: message["seq"]):
            seq = message["seq"]
            if key[0] == "user" and message.get("receiverId") == self.user_id:
                acks.append(message["id"])
            if track.last is not None and seq <= track.last:
                continue
            track.last = seq
            if seq in track.own:
                continue
            action = PUSH_CHANNEL_MESSAGE if key[0] == "channel" else PUSH_USER_MESSAGE
            self._delivered.put_nowait(Push(action, message, key, filled))
        if track.last is not None:
            track.own = {seq for seq in track.own if seq > track.last}
            while track.last + 1 in track.own:
                track.own.discard(track.last + 1)
                track.last += 1
        if acks and self.auto_ack and self._conn is not None:
            self._spawn(self._ack_quietly(acks))

    async def _ack_quietly(self, ids: list[str]) -> None:
        with contextlib.suppress(ZimError, Closed, asyncio.TimeoutError):
            await self._call(ACK, {"ids": ids})

    async def _resync(self) -> None:
        """After a login: what each tracked conversation got meanwhile, then the mailbox."""
        for key, track in list(self._tracks.items()):
            if track.last is not None:
                self._deliver(key, await self._fetch(key, track.last, None), True)
        while True:
            page = await self.pull()
            for message in page["messages"]:
                self._deliver(self._key(message), [message], True)
            if not page.get("hasMore") or not self.auto_ack or not page["messages"]:
                break
            await self.ack([message["id"] for message in page["messages"]])


async def connect(url: str, name: str | None = None, token: str | None = None, **options: Any) -> Client:
    """A started ``Client`` (connected, and logged in with a name, token or ``jwt=``); options as ``Client``."""
    return await Client(url, name, token, **options).start()
