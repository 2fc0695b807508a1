"""The servers bench/peers.py compares (zim, redis-server, nats-server,
bench/asyncio_server.py): their command lines and versions, started fresh for
each measurement as a process tree on loopback ports, and stopped.
"""
from __future__ import annotations

import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import psutil

import benchlib


# -- the servers ---------------------------------------------------------------------
class PeerServer:
    """One server under test on a free loopback port; ``start()`` returns its process
    tree once it accepts connections."""

    def __init__(self, name: str, loop: str) -> None:
        self.name = name
        self.loop = loop                # the asyncio server's event loop
        self.port = 0
        self.zim: benchlib.Server | None = None
        self.process: subprocess.Popen | None = None
        self._tmp: tempfile.TemporaryDirectory | None = None
        self._log = None

    def missing(self) -> str | None:
        """Why this peer cannot run here, or None."""
        binary = {"redis": "redis-server", "nats": "nats-server"}.get(self.name)
        if binary and shutil.which(binary) is None:
            return f"{binary} not found (apt-get install {binary})"
        return None

    def version(self) -> str:
        if self.name == "zim":
            return f"zim {_zim_version()}, 1 worker, durable store (sqlite)"
        if self.name == "asyncio":
            return f"Python {sys.version.split()[0]}, {self.loop}"
        binary = {"redis": "redis-server", "nats": "nats-server"}[self.name]
        try:
            out = subprocess.run([binary, "--version"], capture_output=True, text=True,
                                 timeout=10).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return binary
        if self.name == "redis":        # "Redis server v=7.0.15 sha=... malloc=jemalloc-5.3.0 ..."
            fields = dict(f.split("=", 1) for f in out.split() if "=" in f)
            return f"redis {fields.get('v', '?')} ({fields.get('malloc', '?')})"
        return out.replace("nats-server: ", "nats-server ")

    def command(self, template: bool = False) -> list[str]:
        """The server's command line; ``template``: with PORT and DIR, as the docs show it."""
        port = "PORT" if template else str(self.port)
        directory = "DIR" if template else (self._tmp.name if self._tmp else ".")
        python = "python" if template else sys.executable
        if self.name == "zim":
            if self.zim is not None and not template:
                return self.zim.command
            return [python, "-m", "zim", "--tcp", f"{benchlib.LOOPBACK}:{port}",
                    "--ws", f"{benchlib.LOOPBACK}:{port}", "--data", directory, "--workers", "1",
                    "--channel-rate", "0"]
        if self.name == "redis":
            # maxclients: as many as the open-files limit allows (redis keeps 32 spare).
            hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
            return ["redis-server", "--port", port, "--bind", benchlib.LOOPBACK,
                    "--save", "", "--appendonly", "no", "--maxclients", str(max(1000, hard - 100)),
                    "--dir", directory]
        if self.name == "nats":
            # The config only stops server PINGs (every 2 min by default) from landing
            # in the subscribers' counted streams.
            return ["nats-server", "-a", benchlib.LOOPBACK, "-p", port,
                    "-c", os.path.join(directory, "nats.conf")]
        script = os.path.join("" if template else benchlib.REPO_ROOT, "bench", "asyncio_server.py")
        loop = "uvloop" if self.loop.startswith("uvloop") else "asyncio"
        return [python, script, "--port", port, "--loop", loop]

    def start(self, timeout: float = 30.0) -> benchlib.ProcessTree:
        if self.name == "zim":
            self.zim = benchlib.Server()
            root = self.zim.start(timeout)
            self.port = self.zim.tcp_port
            return benchlib.ProcessTree(root)
        self._tmp = tempfile.TemporaryDirectory(prefix=f"peers-{self.name}-")
        self.port = benchlib.free_port()
        if self.name == "nats":
            with open(os.path.join(self._tmp.name, "nats.conf"), "w") as config:
                config.write('ping_interval: "1h"\n')
        self._log = open(os.path.join(self._tmp.name, "server.log"), "w+b")
        self.process = subprocess.Popen(self.command(), cwd=self._tmp.name, stdout=self._log,
                                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}:\n"
                                   f"{self.log_tail()}")
            try:
                with socket.create_connection((benchlib.LOOPBACK, self.port), timeout=0.5):
                    return benchlib.ProcessTree(psutil.Process(self.process.pid))
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"{self.name} did not listen within {timeout:.0f} s")

    def alive(self) -> bool:
        if self.zim is not None:
            return self.zim.alive()
        return self.process is not None and self.process.poll() is None

    def log_tail(self, size: int = 3000) -> str:
        if self.zim is not None:
            return self.zim.log_tail(size)
        if self._log is None:
            return ""
        self._log.flush()
        self._log.seek(max(0, self._log.seek(0, os.SEEK_END) - size))
        return self._log.read().decode("utf-8", "replace")

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout``; returns the exit code."""
        if self.zim is not None:
            code = self.zim.stop(timeout)
            self.zim = None
            return code
        code = None
        if self.process is not None:
            # nats-server exits 1 on SIGTERM, 0 on SIGINT; the others exit 0 on SIGTERM.
            self.process.send_signal(signal.SIGINT if self.name == "nats" else signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
                print(f"warning: {self.name} ignored SIGTERM for {timeout:.0f} s; killed")
            code = self.process.returncode
            self.process = None
        benchlib.release_files(self._log, self._tmp)
        self._log = self._tmp = None
        return code


def _zim_version() -> str:
    try:
        from importlib.metadata import version
        number = version("zim")
    except Exception:               # not installed as a distribution: the checkout
        number = "?"
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=benchlib.REPO_ROOT,
                                capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        commit = ""
    return f"{number} ({commit})" if commit else number
