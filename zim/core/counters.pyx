# The names of the metric counters (core/counters.pxd), in their order in the array.
# zim.metrics turns them into Prometheus families; Reactor.counters_dict reads them by name.

CLOSE_REASON_NAMES = ("peer", "login_timeout", "idle_timeout", "too_large", "protocol_error",
                      "output_cap", "fd_limit", "shutdown", "server", "no_memory", "memory_budget",
                      "origin", "address_limit")

COUNTER_NAMES = (
    ("accepted",) + tuple("closed_" + name for name in CLOSE_REASON_NAMES)
    + tuple(f"requests_action_{action}" for action in range(REQUEST_ACTIONS)) + ("requests_action_other",)
    + ("errors_unknown_action", "errors_not_logged_in", "errors_internal",
       "deliveries_user", "deliveries_channel", "bytes_in", "bytes_out", "link_bytes_in",
       "link_bytes_out", "deflated_out", "inflated_in", "tcp_deflated_out", "packets_in",
       "memory_releases", "memory_release_ns",
       "connections_tcp", "connections_ws", "logged_in", "links", "outbuf_bytes", "outbuf_max_bytes",
       "link_queue_bytes")
)
GAUGE_NAMES = frozenset(COUNTER_NAMES[FIRST_GAUGE:])
COUNTER_BYTES = N_COUNTERS * 8
assert len(COUNTER_NAMES) == N_COUNTERS and COUNTER_NAMES[C_LINK_QUEUE_BYTES] == "link_queue_bytes"
assert len(CLOSE_REASON_NAMES) == CLOSE_REASONS and COUNTER_NAMES[FIRST_GAUGE] == "connections_tcp"
