"""Free loopback ports, for throwaway servers (zim's, Redis's, Prometheus's)."""
from __future__ import annotations

import socket

LOOPBACK = "127.0.0.1"
CLUSTER_BUS_OFFSET = 10_000     # a Redis Cluster node also listens on port + 10000 (the cluster bus)


def port_is_free(port: int) -> bool:
    """Whether a listener could bind ``port`` on the loopback address now."""
    with socket.socket() as probe:
        try:
            probe.bind((LOOPBACK, port))
        except OSError:
            return False
    return True


def free_loopback_port(with_bus: bool = False) -> int:
    """A loopback port free now (the kernel's choice; another program may take it
    before it is used); ``with_bus``: port + 10000 is free too (cluster nodes)."""
    for _ in range(1000):
        with socket.socket() as probe:
            probe.bind((LOOPBACK, 0))
            port = probe.getsockname()[1]
        if not with_bus or (port + CLUSTER_BUS_OFFSET <= 65535 and port_is_free(port + CLUSTER_BUS_OFFSET)):
            return port
    raise RuntimeError("no free loopback port whose cluster bus port is free too")
