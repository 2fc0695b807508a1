"""Redis backends for the multi-node tests: one redis-server, or a 3-master
Redis Cluster, each keeping an append-only file fsynced before every reply
(``zim.testing.redis.DURABLE_ARGS``), so a test can kill -9 and restart one and
expect every acknowledged write back.
"""
from __future__ import annotations

from typing import Iterator

from tests.support.clusters import require

from zim.testing.redis import DURABLE_ARGS, LocalCluster, LocalRedis


class Backend:
    """Redis servers started for a test module; ``url`` is what nodes get."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.service = LocalRedis(extra_args=DURABLE_ARGS) if kind == "redis" else LocalCluster(3, DURABLE_ARGS)

    @property
    def url(self) -> str:
        return self.service.url

    @property
    def servers(self) -> list[LocalRedis]:
        return self.service.servers if self.kind == "cluster" else [self.service]

    def restart(self, which: int = 0, down_for: float = 0.5) -> None:
        """kill -9 one server and start it again on its port and directory (its AOF)."""
        if self.kind == "cluster":
            self.service.restart(which, down_for)
        else:
            self.service.restart(down_for)


def backend_fixture(kind: str) -> Iterator[Backend]:
    """``"redis"``: one server; ``"cluster"``: three masters formed with redis-cli."""
    require("redis-server")
    if kind == "cluster":
        require("redis-cli")
    backend = Backend(kind)
    backend.service.start()
    try:
        yield backend
    finally:
        backend.service.close()
