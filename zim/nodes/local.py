"""A throwaway redis-server on a free loopback port, for tests and benches.

It keeps nothing (``--save "" --appendonly no``, a temporary directory) and is
stopped with ``close()``. ``kill()``/``start()`` restart it on the same port,
``pause()``/``resume()`` freeze it (SIGSTOP/SIGCONT): the failures a node must
survive.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time

LOOPBACK = "127.0.0.1"


def redis_server_binary() -> str | None:
    """The path of redis-server, or None when it is not installed."""
    return shutil.which("redis-server")


def free_loopback_port() -> int:
    with socket.socket() as probe:
        probe.bind((LOOPBACK, 0))
        return probe.getsockname()[1]


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
        try:
            with socket.create_connection((LOOPBACK, self.port), timeout=0.5) as probe:
                probe.sendall(b"PING\r\n")
                return probe.recv(64).startswith(b"+PONG")
        except OSError:
            return False

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
