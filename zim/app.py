"""The framework: route actions to handlers on top of the Cython reactor.

A handler is ``handler(ctx, body: dict) -> dict``. It runs once per complete
request packet; everything per byte or per member happens in ``zim._core``.
"""
from __future__ import annotations

import logging
import signal
from typing import Any, Callable, Iterable

import orjson
import psutil

from zim._core import PEER_MARK, Reactor
from zim.closelog import CloseLog
from zim.fabric import Fabric, LocalFabric
from zim.limits import READ_BURST_SECONDS, ClientBuckets, ClientLimits, PacedLine, SendLimits, check_count
from zim.origins import DEFAULT as DEFAULT_WS_ORIGINS, origin_check, parse_origins
from zim.process import connection_ceiling
from zim.pushmerge import DEFAULT_PUSH_MAX, PUSH_CHANNEL_MESSAGE, PushMerger, check_push_settings
from zim.storage.retention import Retention
from zim.storage.store import Pending, Quotas, StoreRefusal

log = logging.getLogger("zim")

Handler = Callable[["Ctx", dict], dict]

DEFAULT_MAX_PACKET = 65536
DEFAULT_USER_RATE = 20          # messages a second per user, DMs and channel messages together
DEFAULT_CHANNEL_RATE = 40       # messages per second per channel, the article's figure
DEFAULT_MAX_OUTBUF = 8 * 1024 * 1024    # bytes queued for one connection before it is cut (Redis's
                                        # pub/sub soft limit); --max-client-memory bounds them all
DEFAULT_MAX_INFLIGHT = 128      # requests of one connection waiting for answers before it is not read
CLIENT_MEMORY_SHARE = 4         # auto --max-client-memory: a quarter of the machine over the serving processes
DEFAULT_TOKEN_TTL = 30 * 86400  # seconds a login token is valid (renewed by every login and action 10)
MAX_TOKEN_TTL = 100 * 365 * 86400
MIN_OUTBUF = 2 * 1024 * 1024    # above the largest server packet (< 1 MiB) with room to spare
MAX_OUTBUF = 1024 * 1024 * 1024


class Error(Exception):
    """Raise from a handler to answer ``{"error": {"code", "message"}}``.

    The connection stays open. Codes are those of the protocol
    (``bad_request``, ``not_found``, ``forbidden`` ...) or your own.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class _Deferred:
    """What a handler returns (via ``ctx.later``) when its answer comes later."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "DEFERRED"


DEFERRED = _Deferred()

STORE_FAILED = "the store failed; nothing was stored"
MAX_ERROR_CODES = 64            # distinct error codes counted by name; the rest count as "other"


def error_body(code: str, message: str) -> bytes:
    return orjson.dumps({"error": {"code": code, "message": message}})


def parse_address(text: str, default_port: int) -> tuple[str, int]:
    """``"HOST:PORT"``, ``":PORT"`` or ``"HOST"`` -> (host, port); empty host = all interfaces."""
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = text, str(default_port)
    host = host.strip("[]") or "0.0.0.0"
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"bad port in address {text!r}")
    return host, int(port)


class Ctx:
    """What a handler sees of the connection it serves.

    ``ctx.user_id`` is the logged-in user's id (a decimal string) or None.
    ``ctx.peer``: for a connection not logged in, its source address as a key
    (an IPv4 address as an int; an IPv6 client's /64, hashed), else None.
    ``ctx.app`` is the App (``ctx.app.store`` the store).
    """

    __slots__ = ("app", "conn", "user_id", "peer", "action", "seq", "rechecked", "_after")

    def __init__(self, app: "App", conn: int, user_id: str | None, action: int, seq: int,
                 peer: int | None = None) -> None:
        self.app = app
        self.conn = conn
        self.user_id = user_id
        self.peer = peer
        self.action = action
        self.seq = seq
        self.rechecked = False      # the store was asked to confirm a "no" (zim.im.rechecking)
        self._after: list[bytes] | None = None

    # -- this connection ---------------------------------------------------
    def login(self, user_id: str, channels: Iterable[str] = ()) -> None:
        """Bind this connection to ``user_id``; it receives the pushes of ``channels``."""
        app = self.app
        app.fabric.bind_user(self.conn, int(user_id), [app.group_id(channel) for channel in channels])
        self.user_id = user_id

    def send(self, action: int, body: dict) -> None:
        """Push a packet (seq 0) to this connection, queued after this request's response."""
        if self._after is None:
            self._after = []
        self._after.append(action.to_bytes(2, "big") + orjson.dumps(body))

    def later(self, result: Any, then: Callable[[Any], Any]) -> Any:
        """Continue with ``then(value)`` once a store result is ready, and return
        what to return from the handler: ``then``'s answer now if ``result`` is a
        plain value, else ``DEFERRED`` (the answer, and whatever ``then`` pushes,
        go out once the store has committed; a store failure answers ``internal``)."""
        if not isinstance(result, Pending):
            return then(result)
        if result.outcome is not None:
            ok, value = result.outcome
            if not ok:
                if isinstance(value, StoreRefusal):     # a store limit: nothing was stored
                    raise Error(value.code, value.message)
                log.error("action %d: %s", self.action, value)
                raise Error("internal", STORE_FAILED)
            return then(value)
        result.wait(self.app.finish_later, self, then)
        return DEFERRED

    # -- other connections -------------------------------------------------
    def push_user(self, user_id: str, action: int, body: dict | bytes, exclude_self: bool = False) -> int:
        """Push to every connection of ``user_id``; returns how many were queued.
        ``body`` is a dict, or its JSON already encoded (bytes)."""
        exclude = self.conn if exclude_self else 0
        payload = body if isinstance(body, bytes) else orjson.dumps(body)
        self.app.pushes["user"] += 1
        return self.app.fabric.push_user(int(user_id), action, payload, exclude)

    def push_channel(self, channel: str, action: int, body: dict | bytes, exclude_self: bool = True) -> int:
        """Push to every connection following ``channel`` (encoded once, fanned out in C).

        With merged pushes on (``App.run(push_window_ms=...)``) a channel message
        (action 102) joins the channel's time slice instead and goes out with it as
        one 103 (``zim.pushmerge``); 0 is returned then."""
        app = self.app
        group = app.groups.get(channel)
        if group is None:
            return 0
        exclude = self.conn if exclude_self else 0
        payload = body if isinstance(body, bytes) else orjson.dumps(body)
        app.pushes["channel"] += 1
        if app.push_merger is not None and action == PUSH_CHANNEL_MESSAGE:
            app.push_merger.add(channel, exclude, payload)
            return 0
        return app.fabric.broadcast(group, action, payload, exclude)

    def follow(self, channel: str, user_id: str | None = None) -> None:
        """Every connection of the user (default: this one's) receives ``channel``'s pushes."""
        self.app.follow(channel, user_id or self.user_id)

    def unfollow(self, channel: str, user_id: str | None = None) -> None:
        """Stop ``channel``'s pushes to every connection of the user."""
        self.app.unfollow(channel, user_id or self.user_id)


class App:
    """A zim server: the IM actions plus any handlers you register.

    >>> app = App()
    >>> @app.route(100)
    ... def echo(ctx, body):
    ...     return {"echo": body}
    >>> app.run(tcp=":8081", ws=":8082")          # doctest: +SKIP
    """

    def __init__(self, im: bool = True, store=None) -> None:
        self.routes: dict[int, tuple[Handler, bool]] = {}
        self.groups: dict[str, int] = {}
        self.group_names: list[str] = []    # group id - 1 -> channel
        self.node = None                # zim.nodes.node.Node when run(redis=...) joins a multi-node service
        self.store = store              # None: a DurableStore in the data directory, made by run()
        self.store_link = 0             # the reactor's link to the store's writer process (0: none)
        self.finish_later = self._finish   # made once: one bound method for every wait
        self.reactor: Reactor | None = None
        self.fabric: Fabric | None = None
        self.max_packet = DEFAULT_MAX_PACKET
        self.data_dir: str | None = None
        self.secret: bytes = b""
        self.token_ttl_ms = DEFAULT_TOKEN_TTL * 1000    # run(token_ttl=...)
        self.tokens_v1_until = 0        # Unix ms: version 1 tokens (no expiry) are accepted until then
        self.limits = SendLimits()      # off until run() sets the configured ones
        self.channel_push = True        # a subscribe without "push" gets pushes
        self.push_merger: PushMerger | None = None     # merged pushes (103), when run() turns them on
        self._metrics = None            # zim.metrics.Metrics, made on first use
        self.metrics_address: str | None = None     # run(metrics="HOST:PORT") serves them
        self.auto_client_memory = True  # run() chose --max-client-memory (for the start log)
        self.error_counts: dict[str, int] = {}          # code -> errors answered (App.error)
        self.pushes = {"user": 0, "channel": 0}         # messages pushed (one per message)
        self.logins = 0                 # successful logins (zim.im)
        self.client_limits = ClientLimits()         # run() sets the configured ones
        self.client_buckets = ClientBuckets(self.client_limits)
        self.store_line = PacedLine()   # one user's reads and acks reach the store one at a time (zim.im)
        self.users_created = 0          # ... of them by new users
        if im:
            from zim import im as im_module

            im_module.register(self)

    def route(self, action: int, login: bool = True) -> Callable[[Handler], Handler]:
        """Register ``handler(ctx, body) -> dict`` for ``action`` (1..32767).

        ``login=False`` lets connections that have not logged in call it.
        """
        if not 0 < action < 32768:
            raise ValueError("action must be in 1..32767")

        def register(handler: Handler) -> Handler:
            self.routes[action] = (handler, login)
            return handler

        return register

    # -- channel groups (this worker's connections per channel) ------------
    def group_id(self, channel: str) -> int:
        group = self.groups.get(channel)
        if group is None:
            group = self.groups[channel] = len(self.groups) + 1
            self.group_names.append(channel)
        return group

    def follow(self, channel: str, user_id: str) -> None:
        self.fabric.follow(int(user_id), self.group_id(channel))

    def unfollow(self, channel: str, user_id: str) -> None:
        group = self.groups.get(channel)
        if group is not None:
            self.fabric.unfollow(int(user_id), group)

    # -- requests ------------------------------------------------------------
    def precheck(self, action: int, user: int) -> bytes | None:
        """The answer to a request refused before its handler runs, else None.

        Checks run in the protocol's order: unknown action, then login.
        """
        route = self.routes.get(action)
        if route is None:
            return self.error("unknown_action", f"unknown action {action}")
        if route[1] and not user:
            return self.error("not_logged_in", "log in first (action 1)")
        return None

    def serve(self, conn: int, user: int, action: int, seq: int, payload: bytes) -> None:
        """Answer one request from ``conn``, logged in as ``user``; not logged in:
        0, or ``PEER_MARK | address key`` (zim._core: the reactor's forwarded field)."""
        peer = None
        if user & PEER_MARK:
            peer = (user & ~PEER_MARK) or None
            user = 0
        body = self.precheck(action, user)
        if body is not None:
            self.fabric.reply(conn, action, seq, body, True)
            return
        ctx = Ctx(self, conn, str(user) if user else None, action, seq, peer)
        try:
            request = orjson.loads(payload) if payload else {}
        except orjson.JSONDecodeError:
            request = None
            body = self.error("bad_request", "body is not valid UTF-8 JSON")
        else:
            if not isinstance(request, dict):
                body = self.error("bad_request", "body must be a JSON object")
        if body is None:
            handler = self.routes[action][0]
            body = self._answer(ctx, handler, ctx, request)
            if body is DEFERRED:
                self.fabric.hold(conn)
                return
        self._respond(ctx, body, held=False)

    def _finish(self, ctx: Ctx, then: Callable[[Any], Any], ok: bool, value: Any) -> None:
        """A store result a handler waited on (``Ctx.later``) is ready."""
        if ok:
            body = self._answer(ctx, then, value)
            if body is DEFERRED:
                return              # ``then`` waits on another result
        elif isinstance(value, StoreRefusal):      # a store limit (mailbox_full ...): nothing stored
            ctx._after = None
            body = self.error(value.code, value.message)
        else:
            log.error("action %d: %s", ctx.action, value)
            ctx._after = None
            body = self.error("internal", STORE_FAILED)
        self._respond(ctx, body, held=True)

    def _respond(self, ctx: Ctx, body: bytes, held: bool) -> None:
        fabric = self.fabric
        if held:
            fabric.answer(ctx.conn, ctx.action, ctx.seq, body)
        else:
            fabric.reply(ctx.conn, ctx.action, ctx.seq, body, True)
        if ctx._after:
            for packet in ctx._after:
                fabric.reply(ctx.conn, int.from_bytes(packet[:2], "big"), 0, packet[2:], False)

    def _on_packet(self, conn: int, action: int, seq: int, payload: bytes) -> None:
        """The single-process reactor's callback."""
        if conn == self.store_link:
            self.store.on_link_packet(action, seq, payload)
            return
        reactor = self.reactor
        user = reactor.conn_user(conn)
        self.serve(conn, user or PEER_MARK | reactor.conn_peer(conn), action, seq, payload)

    def error(self, code: str, message: str) -> bytes:
        """The encoded error answer, counted by code (``zim_errors_total``)."""
        counts = self.error_counts
        if code in counts:
            counts[code] += 1
        elif len(counts) < MAX_ERROR_CODES:
            counts[code] = 1
        else:
            counts["other"] = counts.get("other", 0) + 1    # an application's codes stay bounded
        return error_body(code, message)

    def _answer(self, ctx: Ctx, step: Callable[..., Any], *args: Any) -> Any:
        """``step(*args)``, a handler or a ``later`` continuation: its encoded answer, or DEFERRED."""
        try:
            result = step(*args)
        except (Error, StoreRefusal) as exc:
            return self.error(exc.code, exc.message)
        except Exception:
            log.exception("handler for action %d failed", ctx.action)
            return self.error("internal", "internal server error")
        if result is DEFERRED:
            return result
        return orjson.dumps(result if result is not None else {})

    # -- running -----------------------------------------------------------
    def run(
        self,
        tcp: str | None = ":8081",
        ws: str | None = ":8082",
        workers: int = 1,
        data: str = "./zim-data",
        max_packet: int = DEFAULT_MAX_PACKET,
        login_timeout: int = 10,
        idle_timeout: int = 300,
        retention: Retention = Retention(),
        user_rate: float = DEFAULT_USER_RATE,
        channel_rate: float = DEFAULT_CHANNEL_RATE,
        max_outbuf: int = DEFAULT_MAX_OUTBUF,
        channel_push: bool = True,
        push_window_ms: int = 0,
        push_max: int = DEFAULT_PUSH_MAX,
        ws_deflate: bool = True,
        redis: str | None = None,
        metrics: str | None = None,
        max_inflight: int = DEFAULT_MAX_INFLIGHT,
        max_client_memory: int | None = None,
        ws_origins: str | Iterable[str] = DEFAULT_WS_ORIGINS,
        token_ttl: float = DEFAULT_TOKEN_TTL,
        secret_file: str | None = None,
        client_limits: ClientLimits = ClientLimits(),
        quotas: Quotas = Quotas(),
    ) -> None:
        """Serve until SIGTERM or SIGINT. ``tcp``/``ws`` are ``"HOST:PORT"`` (None: off).

        ``data`` holds the token secret and, unless the App was given a store, the
        database (``zim.storage.durable.DurableStore``, pruned by ``retention``).

        ``workers``: 1 serves from this process; N > 1 makes this process the
        supervisor and router of N worker processes sharing the ports.
        ``login_timeout``: seconds a connection may stay without logging in;
        ``idle_timeout``: seconds without a byte received (0 turns either off).
        ``user_rate``: messages a second one user may send (actions 2 and 4
        together, default 20); ``channel_rate``: messages a second per channel (action 4);
        a token bucket each, burst one second's worth; excess is answered
        ``rate_limited`` and not stored; 0 turns a limit off.
        ``max_outbuf``: bytes queued for one connection (a client that stopped
        reading) before the server closes it.
        ``max_inflight``: requests of one connection waiting for their answers
        before the server stops reading it (its next requests wait in the kernel).
        ``max_client_memory``: bytes of output queued for all the clients of one
        serving process (a worker, or the single process); past it the largest
        queues are cut first. None: a quarter of the machine's memory shared
        between the serving processes; 0: no budget.
        ``channel_push``: whether a subscribe without a ``"push"`` field gets pushes
        (False: members read by history unless they ask for ``"push": true``).
        ``push_window_ms``: merge a channel's message pushes into one 103 per member
        connection per slice of this many ms, the first message held until the slice
        ends (0: off, one 102 per message); ``push_max``: the newest messages a 103
        carries, older ones counted in its ``skipped``.
        ``ws_deflate``: accept permessage-deflate from WebSocket clients that offer
        it (no context takeover either way; docs/protocol.md).
        ``ws_origins``: the web origins whose pages may open a WebSocket, as
        ``--ws-origins`` (``"https://chat.example.com,https://app.example.com"``,
        or a list of them; ``"*"``: any; ``null``, ``require-origin``: see
        zim.origins); another Origin gets HTTP 403.
        ``redis``: ``"redis://HOST:PORT/DB"``: this server is one node of several
        sharing that Redis (or Redis Cluster) for users, messages, mailboxes,
        presence and pushes (``zim.nodes``); ``data`` and the App's store are then
        not used. None: a server on its own.
        ``metrics``: ``"HOST:PORT"`` to serve ``/metrics`` (Prometheus), ``/healthz``
        and ``/readyz`` over HTTP from the server's loop (docs/deploy.md); None: off.
        ``token_ttl``: seconds a login token is valid (default 30 days); every
        login answers a new one, and action 10 renews it (zim.tokens).
        ``secret_file``: read the token secret from this file (32 bytes, ours,
        mode 0600) instead of ``DATA/secret`` or, for a node, the Redis key
        ``zim:secret``; every node of a service needs the same one.
        ``client_limits``: connections per address and per user, login, new-user
        and failed-token rates per address, channel creation rate, ack length
        (``zim.limits.ClientLimits``); ``quotas``: mailbox size per user and
        channels a user may create, kept by the store (``zim.storage.store.Quotas``).
        Bad values raise ValueError before anything starts; a data directory,
        secret or database that others may write, or that is not ours, raises
        RuntimeError (zim.datadir).
        """
        self.auto_client_memory = max_client_memory is None
        if max_client_memory is None:
            max_client_memory = max(max_outbuf, default_client_memory(workers))
        options = ServeOptions(tcp, ws, max_packet, login_timeout, idle_timeout, max_outbuf=max_outbuf,
                               ws_deflate=ws_deflate, max_inflight=max_inflight,
                               max_client_memory=max_client_memory, ws_origins=ws_origins,
                               max_conns_per_address=client_limits.max_conns_per_address)
        options.check()
        if not 1 <= workers <= MAX_WORKERS:
            raise ValueError(f"workers must be between 1 and {MAX_WORKERS}")
        if not isinstance(channel_push, bool):
            raise ValueError(f"channel_push must be True or False, not {channel_push!r}")
        limits = SendLimits(user_rate, channel_rate)
        check_push_settings(push_window_ms, push_max)
        if metrics is not None:
            parse_address(metrics, 1)
        self.metrics_address = metrics
        if isinstance(token_ttl, bool) or not isinstance(token_ttl, (int, float)) \
                or not 1 <= token_ttl <= MAX_TOKEN_TTL:
            raise ValueError(f"token_ttl must be between 1 second and 100 years, not {token_ttl!r}")
        self.token_ttl_ms = int(token_ttl * 1000)
        if redis is not None:
            self._join_nodes(redis, retention, secret_file)
        else:
            self._open_data(data, retention, secret_file)
        set_quotas = getattr(self.store, "set_quotas", None)
        if set_quotas is not None:
            set_quotas(quotas)          # before attach: the writer process takes them at its start
        self.max_packet = max_packet
        self.limits = limits
        self.client_limits = client_limits
        self.client_buckets = ClientBuckets(client_limits)
        self.store_line = PacedLine(ack=client_limits.ack_rate, read=(client_limits.read_rate, READ_BURST_SECONDS))
        self.channel_push = channel_push
        self.push_merger = PushMerger(self, push_window_ms, push_max) if push_window_ms else None
        try:
            if workers == 1:
                self._run_single(options)
            else:
                from zim.router import Router

                Router(self, options, workers).run()
        finally:
            self.store.close()

    def _open_data(self, data: str, retention: Retention, secret_file: str | None = None) -> None:
        """Check and open the data directory; a problem raises (the server must not start).
        It is private (zim.datadir): 0700, the secret and the database 0600, ours."""
        from zim import datadir, tokens

        datadir.ensure_private_dir(data)
        self.data_dir = data
        if secret_file is not None:
            datadir.check_file_directory(secret_file, "secret file")
            self.secret = tokens.read_secret_file(secret_file, "secret file")
        else:
            self.secret = tokens.load_or_create_secret(data)
        if self.store is None:
            from zim.storage.durable import DB_FILE, DurableStore, create_database_file

            datadir.check_private_files_in(data, [DB_FILE, DB_FILE + "-wal", DB_FILE + "-shm"], "database")
            create_database_file(data)
            self.store = DurableStore(data, retention)
        since = getattr(self.store, "tokens_v2_since", None)
        if since is not None and since():
            self.tokens_v1_until = since() + self.token_ttl_ms
        ids = getattr(self, "ids", None)
        newest = getattr(self.store, "newest_id", None)
        if ids is not None and newest is not None:
            ids.advance_past(newest())      # ids keep growing even if the clock went back

    def _join_nodes(self, url: str, retention: Retention, secret_file: str | None = None) -> None:
        """Be a node of the service sharing the Redis at ``url`` (blocks until
        Redis answers or RuntimeError)."""
        from zim.ids import Snowflake
        from zim.nodes.node import Node

        self.node = Node(url, retention, secret_file)
        self.store = self.node.store
        self.secret = self.node.secret
        self.tokens_v1_until = self.node.tokens_v2_since + self.token_ttl_ms
        self.ids = Snowflake(self.node.worker_id)

    def start_push_merger(self, reactor: Reactor) -> None:
        """Run the merged pushes' timer, if they are on, on the handlers' reactor."""
        if self.push_merger is not None:
            self.push_merger.start(reactor)

    def stop_push_merger(self) -> None:
        """Send the open slices' pushes now and stop their timer; pushes from
        here on go out unmerged (102), as the server is stopping."""
        if self.push_merger is not None:
            self.push_merger.close()
            self.push_merger = None

    def attach_store(self, reactor: Reactor) -> None:
        """Start the store's writer process, if it has one, on this reactor (or,
        for a node, its links to Redis; the node then wraps ``self.fabric``)."""
        if self.node is not None:
            self.node.attach(self, reactor)
            return
        attach = getattr(self.store, "attach", None)
        if attach is not None:
            attach(reactor, self._set_store_link)

    def _set_store_link(self, link: int) -> None:
        self.store_link = link

    def on_link_closed(self, link: int) -> bool:
        """A link closed; True if it was the store's (which then restarts its writer)."""
        if link and link == self.store_link:
            self.store.on_link_closed()
            return True
        return False

    def every_second(self) -> None:
        """The handlers' once-a-second chores, called by the reactor that runs them."""
        self.limits.purge()
        self.client_buckets.purge()
        self.store_line.release()
        if self.node is not None:
            self.node.beat()
        tick = getattr(self.store, "tick", None)
        if tick is not None:
            tick()                  # a DurableStore restarting its writer after a back-off

    @property
    def metrics(self):
        """This server's ``zim.metrics.Metrics`` (the registry ``--metrics`` serves)."""
        if self._metrics is None:
            # imported here, not at the top: zim.app is imported by every worker, and
            # prometheus_client would add a quarter to a worker's start
            from zim.metrics import Metrics

            self._metrics = Metrics()
        return self._metrics

    def serve_metrics(self, reactor: Reactor, core_counters: Callable[[], dict[str, int]],
                      listening: Callable[[], tuple[bool, str]]) -> None:
        """Expose this server's figures: the reactors' C counters (``core_counters()``,
        over every worker already) and the handlers' own; serve them if ``run`` was
        given a metrics address. ``listening()`` is the server's part of readiness."""
        self.metrics.add_source(lambda: self.metric_families(core_counters()))

        def ready() -> tuple[bool, str]:
            ok, reason = listening()
            if not ok:
                return ok, reason
            return self.store_ready()

        if self.metrics_address is not None:
            server = self.metrics.serve(reactor, self.metrics_address, ready)
            log.info("metrics on http://%s:%d/metrics", *server.address)

    def store_ready(self) -> tuple[bool, str]:
        """Whether the store takes writes: its writer process is up, or Redis is reachable."""
        if self.node is not None:
            if not self.node.redis.up:
                return False, "Redis is not reachable"
            return True, ""
        if not getattr(self.store, "writer_up", True):
            return False, "the store writer is down (restarting)"
        return True, ""

    def metric_families(self, core: dict[str, int]) -> list:
        """The metric families of this server, from the reactors' counters and its own."""
        from zim.metrics import APP_FAMILIES, core_families, families_from_counts
        errors = dict(self.error_counts)
        for code in ("unknown_action", "not_logged_in", "internal"):     # answered in C by workers
            errors[code] = errors.get(code, 0) + core.pop(f"errors_{code}", 0)
        values: dict = {("zim_errors_total", code): count for code, count in errors.items() if count}
        values["zim_logins_total"] = self.logins
        values["zim_users_created_total"] = self.users_created
        for kind, count in self.pushes.items():
            values[("zim_pushes_total", kind)] = count
        for refused in (self.limits.refused, self.client_buckets.refused):
            for scope, count in refused.items():
                values[("zim_rate_limited_total", scope)] = count
        families = core_families(core)
        batch_stats = getattr(self.store, "batch_stats", None)
        if batch_stats is not None:
            values["zim_store_writer_restarts_total"] = self.store.restarts
            families += batch_stats.families()
        if self.node is not None:
            for master, up in self.node.redis.masters_up().items():
                values[("zim_redis_link_up", master)] = int(up)
        return families + families_from_counts(APP_FAMILIES, values)

    def log_limits(self) -> None:
        """Say at start which per-client limits are in force (0: off)."""
        limits, quotas = self.client_limits, getattr(self.store, "quotas", None)
        log.info("client limits: %d connections per address, %d per user; per address a second: %g logins, "
                 "%g new users, %g failed token checks; per user: %g messages, %g new channels a second, "
                 "%d ids per ack, %g acked ids and %d bytes read a second%s", limits.max_conns_per_address, limits.max_conns_per_user,
                 limits.address_login_rate, limits.address_new_user_rate, limits.address_auth_failure_rate,
                 self.limits.user_rate, limits.channel_create_rate, limits.max_ack_ids, limits.ack_rate, limits.read_rate,
                 "" if quotas is None else f"; mailbox {quotas.max_mailbox} messages / "
                 f"{quotas.max_mailbox_bytes} bytes, {quotas.max_channels_per_user} channels created")

    def begin_stop(self) -> None:
        """The server begins to stop (SIGTERM): helpers that end now are not restarted."""
        if hasattr(self.store, "stopping"):
            self.store.stopping = True

    def leave_nodes(self) -> None:
        """A node stopping: its beat goes, its Redis connections close."""
        if self.node is not None:
            self.node.close()

    def user_gone(self, user_id: int) -> None:
        """The user's last connection on this server closed."""
        if self.node is not None:
            self.node.fabric.user_gone(user_id)

    def _run_single(self, options: "ServeOptions") -> None:
        self.reactor = reactor = options.reactor(self._on_packet)
        self.fabric = LocalFabric(reactor)
        close_log = CloseLog("server")

        def tick() -> None:
            close_log(reactor.counters_dict())
            self.every_second()
            self.metrics.tick()

        reactor.on_tick = tick
        reactor.on_link_closed = self.on_link_closed
        reactor.on_user_gone = self.user_gone
        self.attach_store(reactor)
        self.start_push_merger(reactor)
        # handlers first: a signal that comes as soon as the ports accept must stop us
        def stop() -> None:
            self.begin_stop()
            reactor.stop()

        with stop_on_signals(stop):
            try:
                options.listen(reactor)
                log.info("zim serving tcp=%s ws=%s", options.tcp, options.ws)
                log_ceiling(1, options, self.auto_client_memory)
                self.log_limits()
                self.serve_metrics(reactor, reactor.counters_dict, lambda: (True, ""))
                reactor.run()
            finally:
                self.metrics.close()
                self.stop_push_merger()
                self.store.close()      # first: the writer's link closing is then no crash
                self.leave_nodes()
                reactor.close_all()
                close_log(reactor.counters_dict(), final=True)


MAX_WORKERS = 64    # presence keeps one bit per worker in a 64-bit mask


def check_outbuf(max_outbuf: int, max_packet: int) -> None:
    """ValueError unless ``max_outbuf`` holds the largest server packet (< 1 MiB)
    and two of the largest pushes (a client packet of ``max_packet``, sent on)."""
    if isinstance(max_outbuf, bool) or not isinstance(max_outbuf, int):
        raise ValueError(f"max_outbuf must be a number of bytes, not {max_outbuf!r}")
    if not MIN_OUTBUF <= max_outbuf <= MAX_OUTBUF:
        raise ValueError(f"max_outbuf must be between {MIN_OUTBUF} (2 MiB) and {MAX_OUTBUF} (1 GiB) bytes")
    if max_outbuf < 2 * max_packet:
        raise ValueError(f"max_outbuf ({max_outbuf}) must be at least twice max_packet ({max_packet})")


class ServeOptions:
    """Listening addresses and limits, the same for every worker."""

    def __init__(self, tcp: str | None, ws: str | None, max_packet: int,
                 login_timeout: int, idle_timeout: int, max_outbuf: int = DEFAULT_MAX_OUTBUF,
                 ws_deflate: bool = True, max_inflight: int = DEFAULT_MAX_INFLIGHT,
                 max_client_memory: int = 0, ws_origins: str | Iterable[str] = DEFAULT_WS_ORIGINS,
                 max_conns_per_address: int = 0) -> None:
        self.ws_origins = ws_origins        # --ws-origins: "*", or origins allowed (zim.origins)
        self.max_conns_per_address = max_conns_per_address     # over every worker; 0: no limit
        self.max_inflight = max_inflight
        self.max_client_memory = max_client_memory     # bytes per serving process; 0: no budget
        self.tcp = tcp
        self.ws = ws
        self.max_packet = max_packet
        self.login_timeout = login_timeout
        self.idle_timeout = idle_timeout
        self.max_outbuf = max_outbuf
        self.ws_deflate = ws_deflate

    def check(self) -> None:
        if not 8 <= self.max_packet <= 16 * 1024 * 1024:
            raise ValueError("max_packet must be between 8 and 16 MiB")
        for name, value in (("login_timeout", self.login_timeout), ("idle_timeout", self.idle_timeout)):
            if not 0 <= value <= 86400:
                raise ValueError(f"{name} must be between 0 and 86400 seconds")
        check_outbuf(self.max_outbuf, self.max_packet)
        if isinstance(self.max_inflight, bool) or not isinstance(self.max_inflight, int) \
                or not 1 <= self.max_inflight <= 65535:
            raise ValueError(f"max_inflight must be between 1 and 65535, not {self.max_inflight!r}")
        if isinstance(self.max_client_memory, bool) or not isinstance(self.max_client_memory, int) \
                or not (self.max_client_memory == 0 or self.max_client_memory >= self.max_outbuf):
            raise ValueError(f"max_client_memory must be 0 (off) or at least max_outbuf ({self.max_outbuf}), "
                             f"not {self.max_client_memory!r}")
        check_count("max_conns_per_address", self.max_conns_per_address)
        if not isinstance(self.ws_deflate, bool):
            raise ValueError(f"ws_deflate must be True or False, not {self.ws_deflate!r}")
        try:
            self.ws_origins = str(parse_origins(self.ws_origins))  # canonical: as_args passes it on
        except ValueError as exc:
            raise ValueError(f"ws_origins: {exc}") from None
        for address in (self.tcp, self.ws):
            if address:
                parse_address(address, 1)

    def reactor(self, on_packet) -> Reactor:
        return Reactor(self.max_packet, on_packet, outbuf_limit=self.max_outbuf,
                       login_timeout=self.login_timeout, idle_timeout=self.idle_timeout,
                       ws_deflate=self.ws_deflate, max_inflight=self.max_inflight,
                       memory_budget=self.max_client_memory, ws_origins=origin_check(self.ws_origins),
                       max_conns_per_address=self.max_conns_per_address)

    def listen(self, reactor: Reactor) -> None:
        if self.tcp:
            reactor.listen(*parse_address(self.tcp, 8081), False)
        if self.ws:
            reactor.listen(*parse_address(self.ws, 8082), True)

    def as_args(self) -> list[str]:
        """The worker command-line flags carrying these options."""
        return ["--tcp", self.tcp or "off", "--ws", self.ws or "off",
                "--max-packet", str(self.max_packet),
                "--login-timeout", str(self.login_timeout),
                "--idle-timeout", str(self.idle_timeout),
                "--max-outbuf", str(self.max_outbuf),
                "--max-inflight", str(self.max_inflight),
                "--max-client-memory", str(self.max_client_memory),
                "--ws-deflate", "on" if self.ws_deflate else "off",
                "--ws-origins", str(parse_origins(self.ws_origins)),
                "--max-conns-per-address", str(self.max_conns_per_address)]


def default_client_memory(serving_processes: int) -> int:
    """--max-client-memory's default: a quarter of the machine's memory over the serving processes."""
    return psutil.virtual_memory().total // CLIENT_MEMORY_SHARE // max(1, serving_processes)


def log_ceiling(serving_processes: int, options: "ServeOptions", auto_memory: bool) -> None:
    """Say at start how many connections the open-files limit lets the server hold, and
    the memory limits in force."""
    limit, ceiling = connection_ceiling(serving_processes)
    log.info("open files: %d per process; %d serving process%s: at most about %d connections "
             "(docs/deploy.md: raise LimitNOFILE or add workers for more)", limit, serving_processes,
             "" if serving_processes == 1 else "es", ceiling)
    log.info("limits: --max-outbuf %d bytes per connection, --max-client-memory %s per serving process%s, "
             "--max-inflight %d requests per connection", options.max_outbuf,
             f"{options.max_client_memory} bytes" if options.max_client_memory else "off",
             " (auto)" if auto_memory else "", options.max_inflight)


class stop_on_signals:
    """``with stop_on_signals(callback):`` SIGTERM and SIGINT call ``callback()``."""

    def __init__(self, callback: Callable[[], None]) -> None:
        self.callback = callback
        self.old: dict = {}

    def _handle(self, signum, frame) -> None:
        self.callback()

    def __enter__(self) -> "stop_on_signals":
        self.old = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGINT)}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self.old.items():
            signal.signal(sig, handler)
