"""What ``zim-server --metrics HOST:PORT`` exposes, and how it is served.

- ``Metrics`` holds a ``prometheus_client.CollectorRegistry`` and any number of
  *sources*: functions called at each scrape that return metric families built
  from numbers kept where they happen (the reactors' C counters, the App's
  counts, the store writer's shared figures), so nothing is counted twice and
  the hot paths never call into prometheus_client.
- ``core_families(values)`` is the one place that says how the reactor's C
  counters (``accepted``, ``closed_idle_timeout``, ``requests_action_2``...)
  become Prometheus families (``zim_connections_accepted_total``,
  ``zim_connections_closed_total{reason="idle_timeout"}``...);
  ``combine_core_values`` adds up the counters of several reactors (workers).
  ``families_from_counts`` does the same for any table of families.
- ``Metrics.serve(reactor, "HOST:PORT", ready)`` serves ``/metrics`` (the
  Prometheus text format 0.0.4), ``/healthz`` and ``/readyz`` over HTTP on
  the reactor's loop (``zim.httpserve``).
"""
from __future__ import annotations

import logging
from typing import Callable, Iterable, Mapping, Sequence, Union

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from zim._core import CLOSE_REASON_NAMES, COUNTER_NAMES, Reactor
from zim.httpserve import HttpServer, Request, split_host_port

log = logging.getLogger("zim.metrics")

# The text format generate_latest writes. Spelled out: prometheus_client's
# CONTENT_TYPE_LATEST says version=1.0.0 from 0.22 on, for the same bytes here.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
TEXT = "text/plain; charset=utf-8"

COUNTER = "counter"
GAUGE = "gauge"

# (family name, type, help, label name or None): a table for families_from_counts
FamilySpec = tuple[str, str, str, Union[str, None]]
Source = Callable[[], Iterable[Metric]]
Ready = Callable[[], tuple[bool, str]]

# a Redis call is usually well under a millisecond; a link gives up after 5 s
REDIS_CALL_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                      0.25, 0.5, 1.0, 2.5, 5.0)

# -- the reactors' C counters -----------------------------------------------------------

CORE_TABLE: tuple[FamilySpec, ...] = (
    ("zim_connections_accepted_total", COUNTER, "Client connections accepted (TCP and WebSocket).", None),
    ("zim_connections_closed_total", COUNTER, "Client connections closed, by reason.", "reason"),
    ("zim_requests_total", COUNTER, "Client requests received, by action.", "action"),
    ("zim_deliveries_total", COUNTER, "Push packets queued for client connections, by kind.", "kind"),
    ("zim_bytes_received_total", COUNTER, "Bytes read from client connections.", None),
    ("zim_bytes_sent_total", COUNTER, "Bytes written to client connections.", None),
    ("zim_link_bytes_received_total", COUNTER, "Bytes read from the links between zim's processes.", None),
    ("zim_link_bytes_sent_total", COUNTER, "Bytes written to the links between zim's processes.", None),
    ("zim_ws_compressed_messages_total", COUNTER,
     "WebSocket messages compressed (out) or inflated (in) with permessage-deflate.", "direction"),
    ("zim_tcp_compressed_packets_total", COUNTER,
     "TCP packets sent with a compressed body (clients that asked for it at login).", None),
    ("zim_memory_releases_total", COUNTER, "Times the server's processes gave their heap's free pages "
     "back to the kernel (--memory-release-interval).", None),
    ("zim_memory_release_seconds_total", COUNTER, "Time those releases took.", None),
    ("zim_connections", GAUGE, "Client connections open, by transport.", "transport"),
    ("zim_connections_logged_in", GAUGE, "Client connections logged in.", None),
    ("zim_links", GAUGE, "Links open between zim's processes (workers, the store writer).", None),
    ("zim_output_queued_bytes", GAUGE, "Bytes queued for client connections that the kernel has not taken.", None),
    ("zim_output_queued_max_bytes", GAUGE, "The longest output queue of one client connection, in bytes.", None),
    ("zim_link_queue_bytes", GAUGE, "Bytes queued on the links between zim's processes.", None),
)

# C counter name -> (family, label value or None), or None: not exposed on its own.
# Close reasons and request actions come from the core's own lists, so a reason or an
# action counted there is exposed here without a second list to keep equal.
CORE_COUNTERS: dict[str, Union[tuple[str, Union[str, None]], None]] = {
    "accepted": ("zim_connections_accepted_total", None),
    **{f"closed_{reason}": ("zim_connections_closed_total", reason) for reason in CLOSE_REASON_NAMES},
    **{name: ("zim_requests_total", name[len("requests_action_"):])
       for name in COUNTER_NAMES if name.startswith("requests_action_")},
    "deliveries_user": ("zim_deliveries_total", "user"),
    "deliveries_channel": ("zim_deliveries_total", "channel"),
    "bytes_in": ("zim_bytes_received_total", None),
    "bytes_out": ("zim_bytes_sent_total", None),
    "link_bytes_in": ("zim_link_bytes_received_total", None),
    "link_bytes_out": ("zim_link_bytes_sent_total", None),
    "deflated_out": ("zim_ws_compressed_messages_total", "out"),
    "inflated_in": ("zim_ws_compressed_messages_total", "in"),
    "tcp_deflated_out": ("zim_tcp_compressed_packets_total", None),
    "packets_in": None,     # the sum of zim_requests_total
    "memory_releases": ("zim_memory_releases_total", None),
    "memory_release_ns": ("zim_memory_release_seconds_total", None),    # in seconds: CORE_SCALE
    "connections_tcp": ("zim_connections", "tcp"),
    "connections_ws": ("zim_connections", "ws"),
    "logged_in": ("zim_connections_logged_in", None),
    "links": ("zim_links", None),
    "outbuf_bytes": ("zim_output_queued_bytes", None),
    "outbuf_max_bytes": ("zim_output_queued_max_bytes", None),
    "link_queue_bytes": ("zim_link_queue_bytes", None),
}

# counters kept in another unit than their family's: C keeps nanoseconds
CORE_SCALE = {"memory_release_ns": 1e-9}

# counters combined over reactors by their maximum, not their sum
CORE_MAX = frozenset({"outbuf_max_bytes"})

# The handlers' own figures (plain numbers the App keeps: App.metric_families)
APP_FAMILIES: tuple[FamilySpec, ...] = (
    ("zim_errors_total", COUNTER, "Requests answered with an error, by error code.", "code"),
    ("zim_logins_total", COUNTER, "Successful logins.", None),
    ("zim_users_created_total", COUNTER, "Users created by a login without a token.", None),
    ("zim_pushes_total", COUNTER, "Pushes made: one per push to a user's connections (a DM makes two: "
     "the receiver's, the sender's other devices) or to a channel's members.", "kind"),
    ("zim_rate_limited_total", COUNTER, "Requests refused rate_limited, by the limit that refused them "
     "(user, channel, address_login, address_new_user, address_auth_failure, channel_create).", "scope"),
    ("zim_jwt_refusals_total", COUNTER, "JWTs refused at login (action 1), by reason (expired, bad "
     "signature, bad sub ...).", "reason"),
    ("zim_api_requests_total", COUNTER, "Server API (--api) requests answered, by HTTP status "
     "(401: a missing or wrong key).", "status"),
    ("zim_store_writer_restarts_total", COUNTER, "Store writer processes restarted.", None),
    ("zim_worker_restarts_total", COUNTER, "Worker processes restarted.", None),
    ("zim_store_backlog_pauses_total", COUNTER, "Times the supervisor stopped reading its workers' requests "
     "because --max-store-backlog store writes were waiting for the writer.", None),
    ("zim_redis_link_up", GAUGE, "1 while both links to this Redis master are up, else 0.", "master"),
)

_warned_unknown: set[str] = set()


def families_from_counts(table: Sequence[FamilySpec],
                         values: Mapping[Union[str, tuple[str, str]], float]) -> list[Metric]:
    """Metric families for ``table`` (rows of ``(name, "counter"|"gauge", help, label)``)
    from plain numbers: ``values[name]`` for a family without a label,
    ``values[(name, label_value)]`` for one with. Families come in the table's
    order, samples in ``values``' order; a family with no value is left out.
    A counter's name ends in ``_total`` (the sample's name; the family's is
    without it, as prometheus_client wants). ValueError for a key the table
    does not describe."""
    specs = {row[0]: row for row in table}
    samples: dict[str, list[tuple[tuple[str, ...], float]]] = {}
    for key, number in values.items():
        name, label_value = (key, None) if isinstance(key, str) else key
        spec = specs.get(name)
        if spec is None:
            raise ValueError(f"no family {name!r} in the table")
        if (spec[3] is None) != (label_value is None):
            raise ValueError(f"family {name!r} takes {'no label' if spec[3] is None else spec[3]!r}: got {key!r}")
        samples.setdefault(name, []).append(((label_value,) if label_value is not None else (), number))
    families: list[Metric] = []
    for name, kind, help_text, label in table:
        got = samples.get(name)
        if not got:
            continue
        if kind == COUNTER:
            family = CounterMetricFamily(name, help_text, labels=[label] if label else [])
        elif kind == GAUGE:
            family = GaugeMetricFamily(name, help_text, labels=[label] if label else [])
        else:
            raise ValueError(f"family {name!r}: type {kind!r} is neither counter nor gauge")
        for labels, number in got:
            family.add_metric(list(labels), number)
        families.append(family)
    return families


def combine_core_values(per_reactor: Iterable[Mapping[str, int]]) -> dict[str, int]:
    """The C counters of several reactors as one: summed, except ``CORE_MAX``
    (the longest single queue is the largest of theirs)."""
    total: dict[str, int] = {}
    for values in per_reactor:
        for name, number in values.items():
            if name in CORE_MAX:
                total[name] = max(total.get(name, number), number)
            else:
                total[name] = total.get(name, 0) + number
    return total


def core_families(values: Mapping[str, int]) -> list[Metric]:
    """The reactors' C counters (name -> number, over every worker already:
    ``combine_core_values``) as the ``zim_*`` families of ``CORE_TABLE``, mapped
    by ``CORE_COUNTERS``. A name it does not know is left out (logged once):
    a counter added to the core shows up missing, never breaks the scrape."""
    counts: dict[Union[str, tuple[str, str]], float] = {}
    for name, number in values.items():
        if name not in CORE_COUNTERS:
            if name not in _warned_unknown:
                _warned_unknown.add(name)
                log.warning("metrics: core counter %r has no family (zim.metrics.CORE_COUNTERS)", name)
            continue
        target = CORE_COUNTERS[name]
        if target is None:
            continue
        family, label_value = target
        counts[family if label_value is None else (family, label_value)] = number * CORE_SCALE.get(name, 1)
    return families_from_counts(CORE_TABLE, counts)


class _Sources:
    """The collector that asks every source at scrape time."""

    def __init__(self) -> None:
        self.sources: list[Source] = []

    def collect(self) -> Iterable[Metric]:
        for source in list(self.sources):
            try:
                families = list(source())
            except Exception:
                # one broken source loses its own families, not the scrape
                log.exception("metrics source %r failed", source)
                continue
            yield from families


class Metrics:
    """The registry of a zim process and the HTTP endpoints that expose it.

    One instrument, ``redis_latency`` (histogram ``zim_redis_call_seconds``: a node
    observes its once-a-second beat); everything else is counted where it happens,
    as plain numbers (C counters, the App's ints, the writer's shared figures), and
    comes from sources (``add_source``) read at each scrape.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._redis_latency: Histogram | None = None
        self._sources = _Sources()
        self.registry.register(self._sources)
        self.server: HttpServer | None = None
        self._ready: Ready | None = None

    @property
    def redis_latency(self) -> Histogram:
        """``zim_redis_call_seconds``, made on first use (on a node only)."""
        if self._redis_latency is None:
            self._redis_latency = Histogram("zim_redis_call_seconds", "Redis call round trips, in seconds.",
                                            buckets=REDIS_CALL_BUCKETS, registry=self.registry)
        return self._redis_latency

    def add_source(self, source: Source) -> None:
        """Call ``source()`` at each scrape (on the loop that serves it) for a list
        of metric families (``prometheus_client.core`` CounterMetricFamily,
        GaugeMetricFamily...; ``core_families`` makes them). Each family name
        must come from one place only: one source, or one instrument."""
        self._sources.sources.append(source)

    def remove_source(self, source: Source) -> None:
        """Stop calling ``source`` (ValueError if it was not added)."""
        self._sources.sources.remove(source)

    def render(self) -> bytes:
        """Everything, in the Prometheus text format (``CONTENT_TYPE``)."""
        return generate_latest(self.registry)

    def handle(self, request: Request) -> tuple[int, list[tuple[str, str]], bytes]:
        """The answer to one HTTP request (an ``HttpServer`` handler): ``/metrics``,
        ``/healthz`` (200 ``ok`` while the process can answer), ``/readyz`` (200
        ``ok``, or 503 and the reason ``ready()`` gives), else 404. A query
        string is ignored."""
        if request.method not in ("GET", "HEAD"):
            return 405, [("Allow", "GET, HEAD"), ("Content-Type", TEXT)], b"method not allowed\n"
        path = request.path
        if path == "/metrics":
            return 200, [("Content-Type", CONTENT_TYPE)], self.render()
        if path == "/healthz":
            return 200, [("Content-Type", TEXT)], b"ok"
        if path == "/readyz":
            ready, reason = self._is_ready()
            if ready:
                return 200, [("Content-Type", TEXT)], b"ok"
            return 503, [("Content-Type", TEXT)], (reason or "not ready").encode("utf-8", "replace")
        return 404, [("Content-Type", TEXT)], b"not found\n"

    def _is_ready(self) -> tuple[bool, str]:
        if self._ready is None:
            return True, ""
        try:
            ready, reason = self._ready()
        except Exception as exc:
            log.exception("readiness check failed")
            return False, f"readiness check failed: {exc}"
        return bool(ready), str(reason)

    def serve(self, reactor: Reactor, address: str, ready: Ready | None = None, **options) -> HttpServer:
        """Serve the endpoints on ``address`` (``"HOST:PORT"``; ``":PORT"`` all
        interfaces; port 0 a free one, see the result's ``address``) from
        ``reactor``'s loop. ``ready()`` returns ``(ready, reason)``; without it the
        process is always ready. ``options`` go to ``HttpServer`` (max_clients,
        idle_timeout...). Call ``tick()`` once a second and ``close()`` at the end."""
        if self.server is not None:
            raise RuntimeError("metrics are served already")
        host, port = split_host_port(address)
        self._ready = ready
        self.server = HttpServer(reactor, host, port, self.handle, **options)
        return self.server

    def tick(self) -> None:
        """Once a second, from the loop: closes idle HTTP clients."""
        if self.server is not None:
            self.server.tick()

    def close(self) -> None:
        """Stop serving (idempotent); the registry stays usable."""
        server, self.server = self.server, None
        if server is not None:
            server.close()
