"""zim.metrics: the core's counters as Prometheus families, /metrics, /healthz and
/readyz served on a real reactor's loop, over real sockets, and a real
Prometheus scraping it. (The HTTP server itself: test_httpserve.py.)

The reactor runs in a thread of the test (``Loop``, tests/server/http_loop.py);
the test talks to it over loopback sockets, and runs code on the loop
(``loop.call``) through an eventfd the reactor watches, the way a handler would run.
"""
from __future__ import annotations

import logging
import os

import pytest

from tests.server import http_loop
from tests.server.http_loop import HOST, RawClient, port_of, samples, types
from tests.support import prometheus as prometheus_servers
from zim.metrics import (
    APP_FAMILIES, CONTENT_TYPE, CORE_COUNTERS, CORE_TABLE, Metrics, combine_core_values, core_families,
    families_from_counts,
)
from zim.storage.batchstats import BatchStats

prometheus = prometheus_servers.prometheus
loop, metrics = http_loop.loop, http_loop.metrics      # fixtures


# -- the mapping of the C counters (no sockets) -------------------------------------------------

def test_core_families_name_every_c_counter_of_the_core():
    from zim._core import COUNTER_NAMES, GAUGE_NAMES

    # every counter the core keeps has its place (errors_* join the App's zim_errors_total)
    assert set(CORE_COUNTERS) == {name for name in COUNTER_NAMES if not name.startswith("errors_")}
    values = {name: 100 + i for i, name in enumerate(CORE_COUNTERS)}
    m = Metrics()
    m.add_source(lambda: core_families(values))
    got = samples(m.render())
    n = {name: float(value) for name, value in values.items()}
    expected = {
        ("zim_connections_accepted_total", ()): n["accepted"],
        **{("zim_connections_closed_total", (("reason", r),)): n[f"closed_{r}"]
           for r in ["peer", "login_timeout", "idle_timeout", "too_large", "protocol_error", "output_cap",
                     "fd_limit", "shutdown", "server", "no_memory", "memory_budget", "origin",
                     "address_limit"]},
        **{("zim_requests_total", (("action", str(a)),)): n[f"requests_action_{a}"] for a in range(16)},
        ("zim_requests_total", (("action", "other"),)): n["requests_action_other"],
        ("zim_deliveries_total", (("kind", "user"),)): n["deliveries_user"],
        ("zim_deliveries_total", (("kind", "channel"),)): n["deliveries_channel"],
        ("zim_bytes_received_total", ()): n["bytes_in"],
        ("zim_bytes_sent_total", ()): n["bytes_out"],
        ("zim_link_bytes_received_total", ()): n["link_bytes_in"],
        ("zim_link_bytes_sent_total", ()): n["link_bytes_out"],
        ("zim_ws_compressed_messages_total", (("direction", "out"),)): n["deflated_out"],
        ("zim_ws_compressed_messages_total", (("direction", "in"),)): n["inflated_in"],
        ("zim_tcp_compressed_packets_total", ()): n["tcp_deflated_out"],
        ("zim_memory_releases_total", ()): n["memory_releases"],
        ("zim_memory_release_seconds_total", ()): n["memory_release_ns"] * 1e-9,   # C counts ns
        ("zim_connections", (("transport", "tcp"),)): n["connections_tcp"],
        ("zim_connections", (("transport", "ws"),)): n["connections_ws"],
        ("zim_connections_logged_in", ()): n["logged_in"],
        ("zim_links", ()): n["links"],
        ("zim_output_queued_bytes", ()): n["outbuf_bytes"],
        ("zim_output_queued_max_bytes", ()): n["outbuf_max_bytes"],
        ("zim_link_queue_bytes", ()): n["link_queue_bytes"],
    }
    core = {key: value for key, value in got.items() if key[0] in {k[0] for k in expected}}
    assert core == expected
    kinds = types(m.render())
    gauges = {CORE_COUNTERS[name][0] for name in GAUGE_NAMES}      # the core's gauges, and only they
    for name, kind, _, _ in CORE_TABLE:
        assert kinds[name] == kind == ("gauge" if name in gauges else "counter"), name


def test_core_families_skip_unknown_names_and_combine_sums_but_takes_the_max_queue(caplog):
    per_worker = [{"accepted": 3, "outbuf_max_bytes": 10, "connections_tcp": 2, "brand_new": 1},
                  {"accepted": 4, "outbuf_max_bytes": 70, "connections_tcp": 1},
                  {"accepted": 5, "outbuf_max_bytes": 0}]
    combined = combine_core_values(per_worker)
    assert combined == {"accepted": 12, "outbuf_max_bytes": 70, "connections_tcp": 3, "brand_new": 1}
    with caplog.at_level(logging.WARNING, logger="zim.metrics"):
        families = core_families(combined)
    assert {f.name: [s.value for s in f.samples] for f in families} == {
        "zim_connections_accepted": [12], "zim_connections": [3], "zim_output_queued_max_bytes": [70]}
    assert "brand_new" in caplog.text


def test_families_from_counts_refuse_what_the_table_does_not_describe():
    table = [("t_total", "counter", "a counter", None), ("t_gauge", "gauge", "a gauge", "kind")]
    families = families_from_counts(table, {("t_gauge", "a"): 2, "t_total": 1, ("t_gauge", "b"): 3})
    assert [(f.name, f.type) for f in families] == [("t", "counter"), ("t_gauge", "gauge")]
    assert [(s.name, s.labels, s.value) for s in families[1].samples] == [
        ("t_gauge", {"kind": "a"}, 2), ("t_gauge", {"kind": "b"}, 3)]
    assert families_from_counts(table, {}) == []
    with pytest.raises(ValueError):
        families_from_counts(table, {"nope": 1})
    with pytest.raises(ValueError):
        families_from_counts(table, {"t_gauge": 1})             # needs its label
    with pytest.raises(ValueError):
        families_from_counts(table, {("t_total", "x"): 1})      # takes none
    assert {row[0] for row in CORE_TABLE} == {target[0] for target in CORE_COUNTERS.values() if target}


# -- the endpoints -------------------------------------------------------------------------

def test_metrics_serves_sources_and_instruments_read_at_each_scrape(loop, metrics):
    workers = [{"accepted": 3, "closed_peer": 1, "closed_idle_timeout": 2, "requests_action_2": 5,
                "connections_tcp": 4, "outbuf_max_bytes": 10},
               {"accepted": 4, "closed_peer": 2, "requests_action_other": 1, "connections_ws": 2,
                "outbuf_max_bytes": 30}]
    app_values = {("zim_errors_total", "bad_request"): 2, "zim_logins_total": 1,
                  ("zim_rate_limited_total", "user"): 0, ("zim_redis_link_up", "10.0.0.1:6379"): 1}
    stats, fd = BatchStats.create()
    os.close(fd)
    metrics.add_source(lambda: core_families(combine_core_values(workers)))
    metrics.add_source(lambda: families_from_counts(APP_FAMILIES, app_values))
    metrics.add_source(stats.families)
    stats.record(3, 0.002)
    metrics.redis_latency.observe(0.0003)
    client = RawClient(port_of(metrics))
    answer = client.get("/metrics")
    assert answer.status == 200
    assert answer.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8" == CONTENT_TYPE
    got = samples(answer.body)
    assert got[("zim_connections_accepted_total", ())] == 7
    assert got[("zim_connections_closed_total", (("reason", "peer"),))] == 3
    assert got[("zim_connections_closed_total", (("reason", "idle_timeout"),))] == 2
    assert got[("zim_requests_total", (("action", "2"),))] == 5
    assert got[("zim_requests_total", (("action", "other"),))] == 1
    assert got[("zim_connections", (("transport", "tcp"),))] == 4
    assert got[("zim_connections", (("transport", "ws"),))] == 2
    assert got[("zim_output_queued_max_bytes", ())] == 30
    assert got[("zim_errors_total", (("code", "bad_request"),))] == 2
    assert got[("zim_logins_total", ())] == 1
    assert got[("zim_rate_limited_total", (("scope", "user"),))] == 0
    assert got[("zim_store_batch_operations_bucket", (("le", "2.0"),))] == 0
    assert got[("zim_store_batch_operations_bucket", (("le", "5.0"),))] == 1
    assert got[("zim_store_batch_operations_count", ())] == 1
    assert got[("zim_store_commit_seconds_bucket", (("le", "0.0025"),))] == 1
    assert got[("zim_store_commit_seconds_bucket", (("le", "0.001"),))] == 0
    assert got[("zim_redis_link_up", (("master", "10.0.0.1:6379"),))] == 1
    assert got[("zim_redis_call_seconds_count", ())] == 1

    workers[0]["accepted"] = 13                 # the sources are read again at the next scrape
    app_values[("zim_rate_limited_total", "channel")] = 1
    stats.record(700, 0.3)
    got = samples(client.get("/metrics").body)
    assert got[("zim_connections_accepted_total", ())] == 17
    assert got[("zim_rate_limited_total", (("scope", "channel"),))] == 1
    assert got[("zim_store_batch_operations_bucket", (("le", "500.0"),))] == 1
    assert got[("zim_store_batch_operations_bucket", (("le", "1000.0"),))] == 2
    assert got[("zim_store_batch_operations_sum", ())] == 703
    assert got[("zim_store_commit_seconds_bucket", (("le", "+Inf"),))] == 2
    assert loop.call(lambda: metrics.server.clients) == 1       # both on one connection
    client.close()
    stats.close()


def test_a_failing_source_loses_only_its_own_families(loop, metrics):
    def broken():
        raise RuntimeError("source bug")

    metrics.add_source(broken)
    metrics.add_source(lambda: core_families({"accepted": 1}))
    answer = RawClient(port_of(metrics)).get("/metrics")
    assert answer.status == 200
    assert samples(answer.body)[("zim_connections_accepted_total", ())] == 1


def test_healthz_and_readyz_follow_ready(loop):
    state = {"ready": False, "reason": "store writer down"}

    def ready():
        if state["ready"] is None:
            raise RuntimeError("check broke")
        return state["ready"], state["reason"]

    m = Metrics()
    loop.call(lambda: m.serve(loop.reactor, f"{HOST}:0", ready))
    try:
        client = RawClient(port_of(m))
        health = client.get("/healthz")
        assert (health.status, health.body) == (200, b"ok")
        answer = client.get("/readyz")
        assert (answer.status, answer.body) == (503, b"store writer down")
        assert answer.headers["content-type"].startswith("text/plain")
        state.update(ready=True, reason="")
        assert (client.get("/readyz").status, client.get("/readyz").body) == (200, b"ok")
        state.update(ready=False, reason="not listening")
        assert (client.get("/readyz").status, client.get("/readyz").body) == (503, b"not listening")
        state["ready"] = None
        answer = client.get("/readyz")
        assert answer.status == 503 and b"check broke" in answer.body
        assert client.get("/healthz").status == 200       # alive all along
    finally:
        loop.call(m.close)


# -- a real Prometheus ---------------------------------------------------------------------

def test_a_real_prometheus_scrapes_the_values(loop, metrics, prometheus):
    values = {"accepted": 7, "connections_ws": 3, "closed_peer": 2}
    metrics.add_source(lambda: core_families(values))
    metrics.add_source(lambda: families_from_counts(APP_FAMILIES, {("zim_errors_total", "bad_request"): 4}))
    port = port_of(metrics)
    prom = prometheus([f"{HOST}:{port}"])
    assert prom.wait_for("zim_connections_accepted_total", lambda v: v == [7.0]) == [7.0]
    assert prom.wait_for('zim_connections{transport="ws"}') == [3.0]
    assert prom.wait_for('zim_connections_closed_total{reason="peer"}') == [2.0]
    assert prom.wait_for('zim_errors_total{code="bad_request"}') == [4.0]
    values["accepted"] = 9                      # a later scrape sees the new number
    assert prom.wait_for("zim_connections_accepted_total", lambda v: v == [9.0]) == [9.0]
    assert prom.wait_for('up{job="zim"}') == [1.0]
    [target] = prom.targets()
    assert target["health"] == "up" and target["lastError"] == ""
    assert target["scrapeUrl"] == f"http://{HOST}:{port}/metrics"
