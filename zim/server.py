"""The runtime: what assembles a zim server around an ``App`` and runs it.

``Server(app, options)`` chooses and makes, in this order:

- the store: the App's own, a ``MemoryStore`` (``--store memory``) or a
  ``DurableStore`` in the data directory, with the token secret and the
  Snowflake ids; or, with ``--redis``, a ``zim.nodes.node.Node`` and its
  ``RedisStore``, secret and worker id;
- the reactor and the fabric: one process (``LocalFabric``), or the router of
  ``--workers N`` (``zim.router``: ``Router``, ``RouterFabric``), wrapped by the
  node's ``NodeFabric`` when it is one node of several;
- the limits, merged pushes (``zim.pushmerge``) and metrics (``zim.metrics``).

``run()`` serves until SIGTERM or SIGINT. The handlers reach all of it through
``ctx.server`` (``zim.handler.Ctx``); requests come in through ``serve``.
"""
from __future__ import annotations

import logging
from typing import Any, Callable

import orjson

from zim import datadir, tokens
from zim.access import JwtLogins
from zim._core import PEER_KEY_MASK, PEER_MARK, PEER_WS
from zim.api import ServerApi, read_api_key
from zim.archive.config import archive_kinds
from zim.archive.stats import ARCHIVE_FAMILIES
from zim.closelog import CloseLog
from zim.fabric import Fabric, Groups, LocalFabric
from zim.handler import DEFERRED, STORE_FAILED, Ctx, Error, error_body
from zim.ids import Snowflake
from zim.jwtauth import JwtKeys
from zim.limits import READ_BURST_SECONDS, ClientBuckets, PacedLine, SendLimits
from zim.metrics import APP_FAMILIES, Metrics, core_families, families_from_counts
from zim.options import Options
from zim.process import connection_ceiling, stop_on_signals
from zim.protocol import PUSH_CHANNEL_MESSAGE
from zim.pushmerge import PushMerger
from zim.router import Router, RouterFabric
from zim.storage.durable import DB_FILE, DurableStore, create_database_file
from zim.storage.store import MemoryStore, StoreRefusal

log = logging.getLogger("zim")

MAX_ERROR_CODES = 64            # distinct error codes counted by name; the rest count as "other"


class Server:
    """One App served: see the module docstring."""

    def __init__(self, app: Any, options: Options) -> None:
        self.app = app
        self.options = options
        self.groups = Groups()
        self.finish_later = self._finish    # made once: one bound method for every wait
        # the handlers' figures (metrics)
        self.error_counts: dict[str, int] = {}          # code -> errors answered (``error``)
        self.pushes = {"user": 0, "channel": 0}         # messages pushed (one per message)
        self.logins = 0                 # successful logins (zim.im)
        self.users_created = 0          # ... of them by new users
        # the handlers' rules
        self.limits = SendLimits(options.user_rate, options.channel_rate)
        self.client_limits = options.client_limits
        self.client_buckets = ClientBuckets(self.client_limits)
        # one user's reads and acks reach the store one at a time (zim.im)
        self.store_line = PacedLine(ack=self.client_limits.ack_rate,
                                    read=(self.client_limits.read_rate, READ_BURST_SECONDS))
        self.channel_push = options.channel_push     # a subscribe without "push" gets pushes
        self.tcp_deflate = options.tcp_deflate       # a TCP login may ask for compressed packets
        self.token_ttl_ms = int(options.token_ttl * 1000)
        self.tokens_v1_until = 0        # Unix ms: version 1 tokens (no expiry) are accepted until then
        self.metrics = Metrics()
        # who may log in: with a JWT (the keys are read here, in the process running the handlers)
        self.jwt = self._jwt_logins()
        self.anonymous_login = options.anonymous_login
        # the server API (--api): its key read now, so that a bad file stops the start
        self.api: ServerApi | None = None
        self.api_key = read_api_key(options.api_key_file) if options.api is not None else None
        # the store, the secret and the ids
        self.node = None                # zim.nodes.node.Node: one node of a multi-node service
        self.data_dir: str | None = None
        self.store_link = 0             # the reactor's link to the store's writer process (0: none)
        if options.redis is not None:
            self._join_nodes()
        else:
            self._open_data()
        try:
            self._assemble()
        except BaseException:
            self.store.close()
            raise

    # -- making it ------------------------------------------------------------------
    def _open_data(self) -> None:
        """Check and open the data directory; a problem raises (the server must not start).
        It is private (zim.datadir): 0700, the secret and the database 0600, ours."""
        data, secret_file = self.options.data, self.options.secret_file
        datadir.ensure_private_dir(data)
        self.data_dir = data
        if secret_file is not None:
            datadir.check_file_directory(secret_file, "secret file")
            self.secret = tokens.read_secret_file(secret_file, "secret file")
        else:
            self.secret = tokens.load_or_create_secret(data)
        store = self.app.given_store
        if store is None and self.options.store == "memory":
            store = MemoryStore()
        if store is None:
            datadir.check_private_files_in(data, [DB_FILE, DB_FILE + "-wal", DB_FILE + "-shm"], "database")
            create_database_file(data)
            store = DurableStore(data, self.options.retention)
            if self.options.archive is not None:
                store.use_archive(self.options.archive, archive_kinds(self.options.archive_kinds),
                                  self.options.archive_batch)
        elif self.options.archive is not None:
            raise RuntimeError("--archive stands behind zim's own database: an App with a store "
                               "of its own cannot use it")
        self.store = store
        since = getattr(store, "tokens_v2_since", None)
        if since is not None and since():
            self.tokens_v1_until = since() + self.token_ttl_ms
        self.ids = Snowflake(0)         # worker id 0: a server on its own
        newest = getattr(store, "newest_id", None)
        if newest is not None:
            self.ids.advance_past(newest())     # ids keep growing even if the clock went back

    def _jwt_logins(self) -> JwtLogins | None:
        """The JWT keys of ``--jwt-key`` or ``--jwt-jwks`` (None: neither); a key
        file that cannot be used raises (the server must not start)."""
        options = self.options
        if options.jwt_key is None and options.jwt_jwks is None:
            return None
        keys = JwtKeys(options.jwt_key, options.jwt_jwks, audience=options.jwt_audience,
                       issuer=options.jwt_issuer, leeway=options.jwt_leeway, max_token_bytes=options.jwt_max_bytes)
        log.info("JWT logins: keys from %s%s", options.jwt_key or options.jwt_jwks,
                 f" (key ids {', '.join(keys.key_ids)})" if keys.key_ids else "")
        return JwtLogins(keys)

    def _join_nodes(self) -> None:
        """Be a node of the service sharing the Redis at ``--redis`` (blocks until
        Redis answers or RuntimeError)."""
        from zim.nodes.node import Node     # here: the redis extra may not be installed

        options = self.options
        self.node = node = Node(options.redis, options.retention, options.secret_file, archive=options.archive,
                                archive_kinds=options.archive_kinds, archive_batch=options.archive_batch)
        self.store = node.store
        self.secret = node.secret
        self.tokens_v1_until = node.tokens_v2_since + self.token_ttl_ms
        self.ids = Snowflake(node.worker_id)

    def _assemble(self) -> None:
        """The reactor, the fabric and what runs on them."""
        options = self.options
        set_quotas = getattr(self.store, "set_quotas", None)
        if set_quotas is not None:
            set_quotas(options.quotas)      # before the writer starts: it takes them at its start
        self.push_merger = PushMerger(self, options.push_window_ms, options.push_max) \
            if options.push_window_ms else None
        fabric: Fabric
        if options.workers == 1:
            self.router = None
            self.reactor = reactor = options.reactor(
                self._on_packet, on_user_gone=self.user_gone, on_tick=self._tick,
                on_link_closed=self._on_link_closed)
            fabric = LocalFabric(reactor)
        else:
            # the router's reactor serves only the worker links (no listeners)
            self.reactor = reactor = options.reactor(
                self._on_router_packet, on_request=self.serve,    # forwarded requests, unpacked in C
                on_tick=self._tick, on_link_closed=self._on_link_closed)
            self.router = Router(reactor, options, self.app.route_logins(), self.user_gone, self.begin_stop)
            fabric = RouterFabric(self.router)
        self.close_log = CloseLog("server")
        if self.node is not None:
            fabric = self.node.attach(reactor, fabric, self.groups, self.metrics)
        else:
            attach = getattr(self.store, "attach", None)
            if attach is not None:
                attach(reactor, self._set_store_link)   # starts the store's writer process
            set_backlog = getattr(self.store, "set_backlog", None)
            if set_backlog is not None and self.router is not None:
                set_backlog(options.max_store_backlog, self.router.pause_intake)
        self.fabric = fabric
        if self.push_merger is not None:    # with workers, pushes are merged here and fanned out there
            self.push_merger.start(reactor)

    def _set_store_link(self, link: int) -> None:
        self.store_link = link

    # -- running ----------------------------------------------------------------------
    def run(self) -> None:
        """Serve until SIGTERM or SIGINT (or, with workers, until they keep failing at start)."""
        try:
            if self.router is None:
                self._run_single()
            else:
                self._run_router()
        finally:
            self.store.close()

    def _run_single(self) -> None:
        options, reactor = self.options, self.reactor
        # handlers first: a signal that comes as soon as the ports accept must stop us
        with stop_on_signals(self.begin_stop):
            try:
                options.listen(reactor)
                log.info("zim serving tcp=%s ws=%s", options.tcp, options.ws)
                self.log_ceiling(1)
                self.log_limits()
                self.serve_metrics(reactor.counters_dict, lambda: (True, ""))
                self.serve_api(reactor.counters_dict)
                reactor.run()
            finally:
                self._close()
                self.close_log(reactor.counters_dict(), final=True)

    def _run_router(self) -> None:
        router = self.router
        with stop_on_signals(self.begin_stop):
            try:
                router.start_workers()
                log.info("zim supervising %d workers, tcp=%s ws=%s", len(router.slots), self.options.tcp,
                         self.options.ws)
                self.log_ceiling(len(router.slots))
                self.log_limits()
                self.serve_metrics(router.core_counters, router.listening)
                self.metrics.add_source(lambda: families_from_counts(
                    APP_FAMILIES, {"zim_worker_restarts_total": router.worker_restarts}))
                self.serve_api(router.core_counters)
                self.reactor.run()
            finally:
                self._close()
        if router.exit_code:
            raise RuntimeError("workers kept failing at start; see the log above")

    def _close(self) -> None:
        """The end of a run: open merged pushes sent, workers stopped, the store
        closed (first: the writer's link closing is then no crash), Redis left."""
        self.metrics.close()
        if self.api is not None:
            self.api.close()
        self.stop_push_merger()
        if self.router is not None:
            self.router.kill_all()
        self.store.close()
        if self.node is not None:
            self.node.close()           # its beat goes, its Redis connections close
        self.reactor.close_all()

    def begin_stop(self) -> None:
        """SIGTERM or SIGINT: helpers that end from now on are not restarted. One
        process stops its loop; a router sends the open merged-push slices to the
        workers now and asks the workers to stop at its next tick, once those
        commands are out (its loop goes on until they are gone)."""
        if hasattr(self.store, "stopping"):
            self.store.stopping = True
        if self.router is None:
            self.reactor.stop()
        elif not self.router.stopping:
            self.stop_push_merger()
            self.router.begin_stop()

    def stop_push_merger(self) -> None:
        """Send the open slices' pushes now and stop their timer; pushes from
        here on go out unmerged (102), as the server is stopping."""
        if self.push_merger is not None:
            self.push_merger.close()
            self.push_merger = None

    def _tick(self) -> None:
        """Once a second, on the loop."""
        if self.router is None:
            self.close_log(self.reactor.counters_dict())
        self.limits.purge()
        self.client_buckets.purge()
        self.store_line.release()
        if self.jwt is not None:
            self.jwt.reload_if_changed()
        if self.node is not None:
            self.node.beat()
        tick = getattr(self.store, "tick", None)
        if tick is not None:
            tick()                  # a DurableStore restarting its writer after a back-off
        self.metrics.tick()
        if self.api is not None:
            self.api.tick()
        if self.router is not None:
            self.router.tick()

    # -- packets and links ---------------------------------------------------------------
    def _on_packet(self, conn: int, action: int, seq: int, payload: bytes) -> None:
        """The single process's reactor: a client's request, or the store writer's answer."""
        if conn == self.store_link:
            self.store.on_link_packet(action, seq, payload)
            return
        self.serve(conn, self.reactor.request_user(conn), action, seq, payload)

    def _on_router_packet(self, link: int, action: int, seq: int, payload: bytes) -> None:
        """The router's reactor: a worker's event, or the store writer's answer (requests
        come to ``serve`` from C)."""
        if link == self.store_link:
            self.store.on_link_packet(action, seq, payload)
            return
        self.router.on_link_packet(link, action, seq, payload)

    def _on_link_closed(self, link: int) -> None:
        if link and link == self.store_link:
            self.store.on_link_closed()     # the store restarts its writer
        elif self.router is not None:
            self.router.on_link_closed(link)

    def user_gone(self, user_id: int) -> None:
        """The user's last connection on this server closed."""
        if self.jwt is not None:
            self.jwt.forget(user_id)        # its JWT's channel grants end with its session
        if self.node is not None:
            self.node.fabric.user_gone(user_id)

    # -- requests ----------------------------------------------------------------------
    def serve(self, conn: int, user: int, action: int, seq: int, payload: bytes) -> None:
        """Answer one request from ``conn``, logged in as ``user``; not logged in:
        0, or ``PEER_MARK | address key``, with PEER_WS on WebSocket (zim._core: the
        reactor's forwarded field)."""
        peer = None
        websocket = False
        if user & PEER_MARK:
            peer = (user & PEER_KEY_MASK) or None
            websocket = bool(user & PEER_WS)
            user = 0
        refusal = self.app.refusal(action, bool(user))
        if refusal is not None:
            self.fabric.reply(conn, action, seq, self.error(refusal.code, refusal.message), True)
            return
        ctx = Ctx(self, conn, str(user) if user else None, action, seq, peer, websocket)
        body = None
        try:
            request = orjson.loads(payload) if payload else {}
        except orjson.JSONDecodeError:
            body = self.error("bad_request", "body is not valid UTF-8 JSON")
        else:
            if not isinstance(request, dict):
                body = self.error("bad_request", "body must be a JSON object")
        if body is None:
            body = self._answer(ctx, self.app.routes[action][0], ctx, request)
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
            ctx.take_after()
            body = self.error(value.code, value.message)
        else:
            log.error("action %d: %s", ctx.action, value)
            ctx.take_after()
            body = self.error("internal", STORE_FAILED)
        self._respond(ctx, body, held=True)

    def _respond(self, ctx: Ctx, body: bytes, held: bool) -> None:
        fabric = self.fabric
        if held:
            fabric.answer(ctx.conn, ctx.action, ctx.seq, body)
        else:
            fabric.reply(ctx.conn, ctx.action, ctx.seq, body, True)
        if ctx.deflate_granted:         # the login answer went plain; what follows may not
            fabric.tcp_deflate(ctx.conn)
        for packet in ctx.take_after():
            fabric.reply(ctx.conn, int.from_bytes(packet[:2], "big"), 0, packet[2:], False)

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

    # -- what a Ctx does (zim.handler.Runtime) ----------------------------------------------
    def bind_user(self, conn: int, user_id: int, channels) -> None:
        """Log ``conn`` in as ``user_id``; it receives the pushes of ``channels``."""
        self.fabric.bind_user(conn, user_id, [self.groups.id_of(channel) for channel in channels])

    def push_user(self, user_id: int, action: int, payload: bytes, exclude_conn: int) -> int:
        self.pushes["user"] += 1
        return self.fabric.push_user(user_id, action, payload, exclude_conn)

    def push_channel(self, channel: str, action: int, payload: bytes, exclude_conn: int) -> int:
        group = self.groups.get(channel)
        if group is None:
            return 0
        self.pushes["channel"] += 1
        if self.push_merger is not None and action == PUSH_CHANNEL_MESSAGE:
            self.push_merger.add(channel, exclude_conn, payload)
            return 0
        return self.fabric.broadcast(group, action, payload, exclude_conn)

    def follow(self, channel: str, user_id: str) -> None:
        self.fabric.follow(int(user_id), self.groups.id_of(channel))

    def unfollow(self, channel: str, user_id: str) -> None:
        group = self.groups.get(channel)
        if group is not None:
            self.fabric.unfollow(int(user_id), group)

    # -- figures -------------------------------------------------------------------------------
    def serve_metrics(self, core_counters: Callable[[], dict[str, int]],
                      listening: Callable[[], tuple[bool, str]]) -> None:
        """Expose this server's figures: the reactors' C counters (``core_counters()``,
        over every worker already) and the handlers' own; serve them if given a
        metrics address. ``listening()`` is the server's part of readiness."""
        self.metrics.add_source(lambda: self.metric_families(core_counters()))

        def ready() -> tuple[bool, str]:
            ok, reason = listening()
            if not ok:
                return ok, reason
            return self.store_ready()

        if self.options.metrics is not None:
            server = self.metrics.serve(self.reactor, self.options.metrics, ready)
            log.info("metrics on http://%s:%d/metrics", *server.address)

    def serve_api(self, core_counters: Callable[[], dict[str, int]]) -> None:
        """Serve the server API (``--api``) from this process's loop, if asked;
        its stats read ``core_counters()`` (the reactors' C counters, every worker's)."""
        options = self.options
        if options.api is None:
            return
        self.api = ServerApi(self, self.api_key, lambda: self.api_stats(core_counters()))
        http = self.api.serve(self.reactor, options.api, options.api_max_body, options.api_max_clients)
        log.info("server API on http://%s:%d/api/v1/", *http.address)

    def api_stats(self, core: dict[str, int]) -> dict:
        """``GET /api/v1/stats``: connections, users online, channels, messages, and the
        counters the metrics have."""
        users_online = len(self.router.presence) if self.router is not None \
            else self.reactor.stats()["users_online"]
        channel_count = getattr(self.store, "channel_count", None)
        return {
            "connections": core.get("connections_tcp", 0) + core.get("connections_ws", 0),
            "usersOnline": users_online,
            "channels": channel_count() if channel_count is not None else None,
            "messages": {"pushedToUsers": self.pushes["user"], "pushedToChannels": self.pushes["channel"],
                         "deliveries": core.get("deliveries_user", 0) + core.get("deliveries_channel", 0)},
            "logins": self.logins,
            "usersCreated": self.users_created,
            "errors": dict(self.error_counts),
            "api": dict(self.api.counts) if self.api is not None else {},
            "counters": core,
            # a node: the channels whose pushes it takes from Redis (some user connected here follows them)
            **({"followedChannels": len(self.node.fabric.followers)} if self.node is not None else {}),
        }

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
        errors = dict(self.error_counts)
        for code in ("unknown_action", "not_logged_in", "internal"):     # answered in C by workers
            errors[code] = errors.get(code, 0) + core.pop(f"errors_{code}", 0)
        values: dict = {("zim_errors_total", code): count for code, count in errors.items() if count}
        values["zim_logins_total"] = self.logins
        values["zim_users_created_total"] = self.users_created
        if self.jwt is not None:
            for reason, count in self.jwt.refusals.items():
                values[("zim_jwt_refusals_total", reason)] = count
        for kind, count in self.pushes.items():
            values[("zim_pushes_total", kind)] = count
        if self.api is not None:
            for status, count in self.api.counts.items():
                values[("zim_api_requests_total", status)] = count
        for refused in (self.limits.refused, self.client_buckets.refused):
            for scope, count in refused.items():
                values[("zim_rate_limited_total", scope)] = count
        families = core_families(core)
        batch_stats = getattr(self.store, "batch_stats", None)
        if batch_stats is not None:
            values["zim_store_writer_restarts_total"] = self.store.restarts
            if self.router is not None:
                values["zim_store_backlog_pauses_total"] = self.router.intake_pauses
            families += batch_stats.families()
        if self.node is not None:
            for master, up in self.node.redis.masters_up().items():
                values[("zim_redis_link_up", master)] = int(up)
        families += families_from_counts(APP_FAMILIES, values)
        archive_stats = getattr(self.store, "archive_stats", None)     # set when --archive is on
        if archive_stats is not None:
            families += families_from_counts(ARCHIVE_FAMILIES, archive_stats.figures())
        return families

    def log_ceiling(self, serving_processes: int) -> None:
        """Say at start how many connections the open-files limit lets the server hold, and
        the memory limits in force."""
        options = self.options
        limit, ceiling = connection_ceiling(serving_processes)
        log.info("open files: %d per process; %d serving process%s: at most about %d connections "
                 "(docs/deploy.md: raise LimitNOFILE or add workers for more)", limit, serving_processes,
                 "" if serving_processes == 1 else "es", ceiling)
        log.info("limits: --max-outbuf %d bytes per connection, --max-client-memory %s per serving process%s, "
                 "--max-inflight %d requests per connection", options.max_outbuf,
                 f"{options.max_client_memory} bytes" if options.max_client_memory else "off",
                 " (auto)" if options.auto_client_memory else "", options.max_inflight)

    def log_limits(self) -> None:
        """Say at start which per-client limits are in force (0: off)."""
        limits, quotas = self.client_limits, getattr(self.store, "quotas", None)
        log.info("client limits: %d connections per address, %d per user; per address a second: %g logins, "
                 "%g new users, %g failed token checks; per user: %g messages, %g new channels a second, "
                 "%d ids per ack, %g acked ids and %d bytes read a second%s", limits.max_conns_per_address,
                 limits.max_conns_per_user, limits.address_login_rate, limits.address_new_user_rate,
                 limits.address_auth_failure_rate, self.limits.user_rate, limits.channel_create_rate,
                 limits.max_ack_ids, limits.ack_rate, limits.read_rate,
                 "" if quotas is None else f"; mailbox {quotas.max_mailbox} messages / "
                 f"{quotas.max_mailbox_bytes} bytes, {quotas.max_channels_per_user} channels created")
