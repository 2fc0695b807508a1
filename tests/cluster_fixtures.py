"""Throwaway Redis servers for the schema tests: one plain server, or a local
3-master Redis Cluster, on free loopback ports, keeping nothing on disk that
outlives the test (``--save "" --appendonly no``, a temporary directory).

``local_redis()`` and ``local_cluster()`` are context managers yielding a
redis-py client (``Redis`` / ``RedisCluster``); they skip the test with a reason
when redis-server or redis-cli is not installed.
"""
from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
from typing import Iterator

import pytest
import redis
from redis.cluster import RedisCluster

from zim.nodes.local import LocalRedis

LOOPBACK = "127.0.0.1"
BUS_OFFSET = 10_000          # a cluster node also listens on port + 10000 (the cluster bus)
START_TIMEOUT = 10.0
CLUSTER_TIMEOUT = 20.0


def _binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (apt-get install redis-server)")
    return path


def _port_is_free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind((LOOPBACK, port))
        except OSError:
            return False
    return True


def free_port(with_bus: bool = False) -> int:
    """A free loopback port; ``with_bus``: port + 10000 is free too (cluster nodes)."""
    while True:
        with socket.socket() as probe:
            probe.bind((LOOPBACK, 0))
            port = probe.getsockname()[1]
        if not with_bus:
            return port
        if port + BUS_OFFSET <= 65535 and _port_is_free(port + BUS_OFFSET):
            return port


def _start(port: int, *extra: str) -> LocalRedis:
    """A LocalRedis on ``port``, started (skips the test when redis-server is missing)."""
    _binary("redis-server")
    return LocalRedis(port, extra).start(START_TIMEOUT)


@contextlib.contextmanager
def local_redis() -> Iterator[redis.Redis]:
    """One redis-server on a free loopback port; yields a client to it."""
    server = _start(free_port())
    client = redis.Redis(host=LOOPBACK, port=server.port)
    try:
        yield client
    finally:
        client.close()
        server.close()


@contextlib.contextmanager
def local_cluster(masters: int = 3) -> Iterator[RedisCluster]:
    """A Redis Cluster of ``masters`` masters and no replicas on free loopback
    ports, formed with ``redis-cli --cluster create``; yields a RedisCluster
    client once every node reports cluster_state:ok."""
    cli = _binary("redis-cli")
    nodes: list[LocalRedis] = []
    try:
        ports: list[int] = []
        while len(ports) < masters:
            port = free_port(with_bus=True)
            if port not in ports:
                ports.append(port)
        for port in ports:
            # each node keeps its cluster config in its own directory (relative to --dir)
            nodes.append(_start(port, "--cluster-enabled", "yes", "--cluster-config-file",
                                f"nodes-{port}.conf", "--cluster-node-timeout", "5000"))
        subprocess.run([cli, "--cluster", "create", *(f"{LOOPBACK}:{port}" for port in ports),
                        "--cluster-replicas", "0", "--cluster-yes"],
                       check=True, capture_output=True, timeout=CLUSTER_TIMEOUT)
        _wait_cluster_ok(ports)
        client = RedisCluster(host=LOOPBACK, port=ports[0])
        try:
            yield client
        finally:
            client.close()
    finally:
        for node in nodes:
            node.close()


def _wait_cluster_ok(ports: list[int]) -> None:
    deadline = time.monotonic() + CLUSTER_TIMEOUT
    for port in ports:
        node = redis.Redis(host=LOOPBACK, port=port)
        try:
            while node.execute_command("CLUSTER", "INFO").find(b"cluster_state:ok") < 0:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"cluster node :{port} never reached cluster_state:ok")
                time.sleep(0.05)
        finally:
            node.close()
