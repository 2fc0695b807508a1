"""Throwaway Redis servers for the Redis tests: one plain server, or a local
3-master Redis Cluster (``zim.testing.redis``), on free loopback ports, keeping
nothing on disk that outlives the test (``--save "" --appendonly no``, a
temporary directory).

``local_redis()`` and ``local_cluster()`` are context managers yielding a
redis-py client (``Redis`` / ``RedisCluster``); they skip the test with a reason
when redis-server or redis-cli is not installed.
"""
from __future__ import annotations

import contextlib
import shutil
from typing import Iterator

import pytest
import redis
from redis.cluster import RedisCluster

from zim.testing.redis import LOOPBACK, LocalCluster, LocalRedis


def require(name: str) -> None:
    """Skip the test, saying why, when a Redis program is not installed."""
    if shutil.which(name) is None:
        pytest.skip(f"{name} is not installed (apt-get install redis-server)")


@contextlib.contextmanager
def local_redis() -> Iterator[redis.Redis]:
    """One redis-server on a free loopback port; yields a client to it."""
    require("redis-server")
    with LocalRedis() as server:
        client = redis.Redis(host=LOOPBACK, port=server.port)
        try:
            yield client
        finally:
            client.close()


@contextlib.contextmanager
def local_cluster(masters: int = 3) -> Iterator[RedisCluster]:
    """A Redis Cluster of ``masters`` masters and no replicas; yields a
    RedisCluster client once every node reports cluster_state:ok."""
    require("redis-server")
    require("redis-cli")
    with LocalCluster(masters) as cluster:
        client = RedisCluster(host=LOOPBACK, port=cluster.servers[0].port)
        try:
            yield client
        finally:
            client.close()
