# The reactor's metric counters: one flat uint64 array (Reactor.share_counters can move it
# into memory another process reads), so counting costs one add and no Python object.
# Client connections only: the links between zim's own processes are counted apart.
# The names Python reads them by are in core/counters.pyx.

# Why a connection was closed (conn_t.close_reason, set by the first decision to close it;
# unset means the peer closed or broke it). Counted by reason at the close.
cdef enum:
    R_PEER = 0
    R_LOGIN_TIMEOUT = 1
    R_IDLE_TIMEOUT = 2
    R_TOO_LARGE = 3
    R_PROTOCOL_ERROR = 4
    R_OUTPUT_CAP = 5
    R_FD_LIMIT = 6          # refused at accept: never a connection, counted directly
    R_SHUTDOWN = 7
    R_SERVER = 8            # closed by the application (Reactor.close)
    R_NO_MEMORY = 9
    R_MEMORY_BUDGET = 10    # the worker's output queues passed --max-client-memory: largest cut first
    R_ORIGIN = 11           # a WebSocket handshake from an Origin not in --ws-origins
    R_ADDRESS_LIMIT = 12    # refused at accept: its address has --max-conns-per-address already
    CLOSE_REASONS = 13

cdef enum:
    REQUEST_ACTIONS = 16            # actions counted one by one; the rest as "other"
    C_ACCEPTED = 0
    C_CLOSED = 1                    # + reason: C_CLOSED .. C_CLOSED + CLOSE_REASONS - 1
    C_REQUESTS = C_CLOSED + CLOSE_REASONS       # + action for actions 0..15; + 16: any other
    C_ERR_UNKNOWN_ACTION = C_REQUESTS + REQUEST_ACTIONS + 1     # refusals answered in C (workers)
    C_ERR_NOT_LOGGED_IN
    C_ERR_NO_ROUTER
    C_DELIVERIES_USER               # push packets queued to connections
    C_DELIVERIES_CHANNEL
    C_BYTES_IN
    C_BYTES_OUT
    C_LINK_BYTES_IN
    C_LINK_BYTES_OUT
    C_DEFLATED_OUT
    C_INFLATED_IN
    C_TCP_DEFLATED_OUT              # TCP packets sent with a compressed body (F_TCP_DEFLATE)
    C_PACKETS_IN
    C_MEMORY_RELEASES               # malloc_trim calls (--memory-release-interval)
    C_MEMORY_RELEASE_NS             # time they took
    # gauges: values now, not totals
    C_CONNECTIONS_TCP               # WebSocket ones count as ws from accept, handshake included
    C_CONNECTIONS_WS
    C_LOGGED_IN
    C_LINKS
    C_OUTBUF_BYTES                  # refreshed once a second (a table scan, off the hot path)
    C_OUTBUF_MAX_BYTES
    C_LINK_QUEUE_BYTES
    N_COUNTERS
    FIRST_GAUGE = C_CONNECTIONS_TCP
