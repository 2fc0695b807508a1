"""A throwaway redis-server on a free loopback port, or a local Redis Cluster of
several, for tests and benches.

``LocalRedis`` keeps nothing (``--save "" --appendonly no``, a temporary
directory) unless given ``DURABLE_ARGS``, and is stopped with ``close()``.
``kill()``/``start()`` restart it on the same port and directory,
``pause()``/``resume()`` freeze it (SIGSTOP/SIGCONT): the failures a node must
survive. ``LocalCluster`` forms masters of those with ``redis-cli --cluster create``.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time

from zim.testing.ports import LOOPBACK, free_loopback_port

# What "nothing acknowledged is lost" needs of Redis when redis-server itself is
# killed (docs/redis.md): every write in the AOF before its reply is sent. (The
# last --appendonly given wins over LocalRedis's "no".)
DURABLE_ARGS = ("--appendonly", "yes", "--appendfsync", "always")
CLUSTER_TIMEOUT = 20.0


def redis_server_binary() -> str | None:
    """The path of redis-server, or None when it is not installed."""
    return shutil.which("redis-server")


class LocalRedis:
    """One redis-server process on ``127.0.0.1:port``; see the module docstring."""

    def __init__(self, port: int | None = None, extra_args: tuple[str, ...] = ()) -> None:
        """``extra_args``: more redis-server options (e.g. ``--cluster-enabled yes``)."""
        binary = redis_server_binary()
        if binary is None:
            raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
        self.binary = binary
        self.port = port or free_loopback_port()
        self.host = LOOPBACK
        self._dir = tempfile.TemporaryDirectory(prefix="zim-redis-")
        self.extra_args = tuple(extra_args)
        self.process: subprocess.Popen | None = None

    @property
    def directory(self) -> str:
        """Its working directory (removed by ``close``)."""
        return self._dir.name

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def start(self, timeout: float = 10.0) -> "LocalRedis":
        """Start redis-server and wait until it answers PING."""
        log = open(os.path.join(self._dir.name, "redis.log"), "ab")
        self.process = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", LOOPBACK, "--save", "",
             "--appendonly", "no", "--dir", self._dir.name, *self.extra_args],
            stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + timeout
        while not self.answers_ping():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"redis-server on port {self.port} did not start: {self.log_tail()}")
            time.sleep(0.02)
        return self

    def answers_ping(self) -> bool:
        """Whether the server answers PING within half a second (a blocking probe)."""
        return self.ask(b"PING\r\n").startswith(b"+PONG")

    def ask(self, inline_command: bytes) -> bytes:
        """The start of the reply to one inline command (b"" if none within half a second)."""
        try:
            with socket.create_connection((LOOPBACK, self.port), timeout=0.5) as probe:
                probe.sendall(inline_command)
                return probe.recv(4096)
        except OSError:
            return b""

    def pid(self) -> int:
        return self.process.pid if self.process else 0

    def kill(self) -> None:
        """SIGKILL the server and reap it (the port is free again at once). It keeps
        nothing on disk, so this is also how it stops."""
        if self.process is not None and self.process.poll() is None:
            # SIGKILL ends a stopped (paused) process too; continuing it first would
            # let it answer, for a moment, what it held while paused
            self.process.kill()
            self.process.wait(10)

    def restart(self, down_for: float = 0.5) -> None:
        """kill -9, then start again on the same port and directory (its AOF, if any)."""
        self.kill()
        time.sleep(down_for)
        self.start()

    def pause(self) -> None:
        os.kill(self.pid(), signal.SIGSTOP)

    def resume(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGCONT)

    def close(self) -> None:
        """Stop the server and remove its directory."""
        self.kill()
        self._dir.cleanup()

    def log_tail(self, size: int = 2000) -> str:
        try:
            with open(os.path.join(self._dir.name, "redis.log"), "rb") as log:
                return log.read()[-size:].decode(errors="replace")
        except OSError:
            return ""

    def __enter__(self) -> "LocalRedis":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()


class LocalCluster:
    """A Redis Cluster of ``masters`` LocalRedis masters (no replicas) on free
    loopback ports, each with ``extra_args`` too; ``start()`` returns once every
    node reports ``cluster_state:ok``. ``servers[i].kill()``/``restart(i)`` take
    one master down and back (its cluster config stays in its directory)."""

    def __init__(self, masters: int = 3, extra_args: tuple[str, ...] = ()) -> None:
        self.masters = masters
        self.extra_args = tuple(extra_args)
        self.servers: list[LocalRedis] = []

    @property
    def url(self) -> str:
        """Any master's URL: a node finds the others from it."""
        return self.servers[0].url

    def start(self, timeout: float = CLUSTER_TIMEOUT) -> "LocalCluster":
        cli = shutil.which("redis-cli")
        if cli is None:
            raise RuntimeError("redis-cli is not installed (apt-get install redis-server)")
        try:
            ports: list[int] = []
            while len(ports) < self.masters:
                port = free_loopback_port(with_bus=True)
                if port not in ports:
                    ports.append(port)
            for port in ports:
                self.servers.append(LocalRedis(port, (
                    *self.extra_args, "--cluster-enabled", "yes", "--cluster-config-file", f"nodes-{port}.conf",
                    "--cluster-node-timeout", "5000")).start(timeout))
            subprocess.run([cli, "--cluster", "create", *(f"{LOOPBACK}:{port}" for port in ports),
                            "--cluster-replicas", "0", "--cluster-yes"],
                           check=True, capture_output=True, timeout=timeout)
            self.wait_ok(timeout)
        except BaseException:
            self.close()
            raise
        return self

    def wait_ok(self, timeout: float = CLUSTER_TIMEOUT) -> None:
        """Wait until every master reports ``cluster_state:ok``."""
        deadline = time.monotonic() + timeout
        for server in self.servers:
            while b"cluster_state:ok" not in server.ask(b"CLUSTER INFO\r\n"):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"cluster node :{server.port} never reached cluster_state:ok")
                time.sleep(0.05)

    def restart(self, which: int, down_for: float = 0.5) -> None:
        """kill -9 one master, start it again on its port and directory, and wait
        until the cluster is whole."""
        self.servers[which].restart(down_for)
        self.wait_ok()

    def close(self) -> None:
        for server in self.servers:
            server.close()
        self.servers = []

    def __enter__(self) -> "LocalCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()
