"""Shared pieces of the zim benchmarks: a real server process, the wire format
(zim.client's codec), reporting.

Only standard library, zim, orjson and psutil (redis-py too for the benches of nodes:
``redis_and_archive``). Every wait here is bounded in time.
"""
from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import platform
import select
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

import psutil

from zim.client import (TCP_HEADER_SIZE, new_ws_key, split_tcp, split_ws, tcp_packet, ws_packet,  # noqa: F401
                        ws_upgrade_accepted, ws_upgrade_request)
from zim.testing.ports import free_loopback_port as free_port

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOOPBACK = "127.0.0.1"

# -- wire format: zim.client's codec, under the names the benches use ----------
HEADER_SIZE = TCP_HEADER_SIZE   # 8
tcp_split = split_tcp           # (action, seq, body) of every whole packet, removed from a bytearray
ws_split = split_ws             # (opcode, action, seq, body) of every whole server frame
ws_handshake_ok = ws_upgrade_accepted   # (response head, key) -> bool


def ws_handshake_request(port: int) -> tuple[bytes, str]:
    """The client's upgrade request and its key (for ``ws_handshake_ok``)."""
    key = new_ws_key()
    return ws_upgrade_request(key, f"{LOOPBACK}:{port}", "/bench"), key


IP_BIND_ADDRESS_NO_PORT = 24    # linux/in.h: choose the source port at connect(), not bind()


def source_address(index: int, sources: int) -> str | None:
    """The source address of client ``index`` spread over 127.0.0.1..``sources`` (None:
    the kernel's choice). One address has only ~28,000 ephemeral ports per server port."""
    return None if sources <= 1 else f"127.0.0.{1 + index % sources}"


def start_connect(epoll: select.epoll, port: int, source: str | None = None) -> tuple[socket.socket, int]:
    """A non-blocking connect to the loopback port (from ``source`` if given),
    registered for EPOLLOUT; the socket and connect_ex's code (0 or EINPROGRESS
    when it is under way)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    if source is not None:
        sock.setsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
        sock.bind((source, 0))
    code = sock.connect_ex((LOOPBACK, port))
    epoll.register(sock.fileno(), select.EPOLLOUT)
    return sock, (0 if code == errno.EINPROGRESS else code)


def read_some(fd: int, buffers: list) -> int:
    """readv into ``buffers``: bytes read, 0 when the peer closed (or failed), -1 when
    nothing was waiting."""
    try:
        return os.readv(fd, buffers)
    except BlockingIOError:
        return -1
    except OSError:
        return 0


# -- the server under test ----------------------------------------------------
def release_files(log, tmp: tempfile.TemporaryDirectory | None) -> None:
    """Close a server's log file and remove its temporary directory (either may be None)."""
    if log is not None:
        log.close()
    if tmp is not None:
        tmp.cleanup()


# Benches measure throughput, not the limits (bench/abuse.py measures those), and
# their clients mostly come from 127.0.0.1: the rate and count limits are off.
BENCH_LIMITS = ("--channel-rate", "0", "--user-rate", "0", "--max-conns-per-address", "0",
                "--address-login-rate", "0", "--address-new-user-rate", "0", "--address-auth-failure-rate", "0",
                "--channel-create-rate", "0", "--ack-rate", "0", "--max-mailbox", "0", "--max-mailbox-bytes", "0")


def _sockets_on_port(port: int, state: str) -> dict[str, int]:
    """This machine's TCP sockets on local port ``port`` in ``state`` (ss's state
    filter: "listening", "established"): their inode as /proc/PID/fd shows it
    (``socket:[N]``) -> the peer's port. ``ss`` asks the kernel over netlink; psutil's
    walk of /proc/net/tcp takes minutes while another bench holds a million sockets."""
    try:
        lines = subprocess.run(["ss", "-Htne", "state", state, f"sport = :{port}"], capture_output=True,
                               text=True, timeout=60, check=True).stdout.splitlines()
    except (OSError, subprocess.SubprocessError):
        return {}
    found: dict[str, int] = {}
    for line in lines:
        words = line.split()        # Recv-Q Send-Q Local Peer [timer:(...)] ino:N ... (no state column)
        inode = next((word[4:] for word in words if word.startswith("ino:")), None)
        if inode is not None and len(words) >= 4:
            peer = words[3].rpartition(":")[2]
            found[f"socket:[{inode}]"] = int(peer) if peer.isdigit() else 0
    return found


def _socket_inodes(pid: int) -> set[str]:
    """The sockets among a process's descriptors, as ``socket:[N]`` (empty if it is gone)."""
    targets = set()
    try:
        descriptors = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return targets
    for fd in descriptors:
        try:
            targets.add(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            pass                # closed since the listing
    return targets


@dataclass
class Server:
    """A ``python -m zim --workers N`` process on loopback ports, with its data in a
    temporary dir (``start()`` returns once all N workers listen)."""

    extra_args: list[str] = field(default_factory=list)
    workers: int = 1
    redis: str | None = None     # redis://HOST:PORT/DB: one node of a multi-node service (--redis)
    default_limits: bool = False    # keep zim's default abuse limits (bench/abuse.py); else BENCH_LIMITS
    tcp_port: int = 0
    ws_port: int = 0
    process: subprocess.Popen | None = None
    data_dir: str = ""
    _tmp: tempfile.TemporaryDirectory | None = None
    _log = None

    @property
    def command(self) -> list[str]:
        return [sys.executable, "-m", "zim",
                "--tcp", f"{LOOPBACK}:{self.tcp_port}", "--ws", f"{LOOPBACK}:{self.ws_port}",
                "--data", self.data_dir, "--workers", str(self.workers),
                *(() if self.default_limits else BENCH_LIMITS),
                *(["--redis", self.redis] if self.redis else []), *self.extra_args]

    def start(self, timeout: float = 30.0) -> psutil.Process:
        self._tmp = tempfile.TemporaryDirectory(prefix="zim-bench-")
        self.data_dir = os.path.join(self._tmp.name, "data")
        self.tcp_port, self.ws_port = free_port(), free_port()
        self._log = open(os.path.join(self._tmp.name, "server.log"), "w+b")
        # cwd = the repository, so `-m zim` runs the checkout being measured.
        self.process = subprocess.Popen(self.command, cwd=REPO_ROOT, stdout=self._log,
                                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"zim exited with {self.process.returncode}:\n{self.log_tail()}")
            if _accepts(self.tcp_port) and _accepts(self.ws_port):
                if self.workers == 1 or len(self.listening_workers()) == self.workers:
                    return psutil.Process(self.process.pid)
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"zim did not listen within {timeout:.0f} s:\n{self.log_tail()}")

    def worker_processes(self) -> list[psutil.Process]:
        """The processes that serve clients: the server itself with one worker, else
        the supervisor's children (``python -m zim.worker``), ordered by ``--index``."""
        root = psutil.Process(self.process.pid)
        if self.workers == 1:
            return [root]
        return sorted(root.children(), key=_worker_index)

    def listening_workers(self) -> list[psutil.Process]:
        """The worker processes that already listen on the TCP port."""
        listeners = set(_sockets_on_port(self.tcp_port, "listening"))
        return [worker for worker in self.worker_processes() if _socket_inodes(worker.pid) & listeners]

    def client_workers(self) -> dict[int, int]:
        """Which worker serves each TCP client: client's local port -> worker position
        in ``worker_processes()`` (a connection lands by SO_REUSEPORT's 4-tuple hash)."""
        clients = _sockets_on_port(self.tcp_port, "established")
        inodes = clients.keys()
        served: dict[int, int] = {}
        for position, worker in enumerate(self.worker_processes()):
            for inode in _socket_inodes(worker.pid) & inodes:
                served[clients[inode]] = position
        return served

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_tail(self, size: int = 4000) -> str:
        if self._log is None:
            return ""
        self._log.flush()
        self._log.seek(0, os.SEEK_END)
        end = self._log.tell()
        self._log.seek(max(0, end - size))
        return self._log.read().decode("utf-8", "replace")

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM (repeated every few seconds), then SIGKILL after ``timeout``.

        Returns the exit code. A server that needed more than one SIGTERM is
        reported on stderr: that is a bug worth knowing about.
        """
        code = None
        if self.process is not None:
            deadline = time.monotonic() + timeout
            signals = 0
            while self.process.poll() is None and time.monotonic() < deadline:
                self.process.send_signal(signal.SIGTERM)
                signals += 1
                try:
                    self.process.wait(min(5.0, max(0.1, deadline - time.monotonic())))
                except subprocess.TimeoutExpired:
                    pass
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait(5)
                print(f"warning: zim ignored SIGTERM for {timeout:.0f} s; killed", file=sys.stderr)
            elif signals > 1:
                print(f"warning: zim stopped only after {signals} SIGTERMs", file=sys.stderr)
            code = self.process.returncode
        release_files(self._log, self._tmp)
        self._log = self._tmp = None
        return code

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _worker_index(process: psutil.Process) -> tuple[int, int]:
    """A worker's ``--index`` from its command line (then its pid) for a stable order."""
    try:
        command = process.cmdline()
        return int(command[command.index("--index") + 1]), process.pid
    except (psutil.Error, ValueError, IndexError):
        return 1 << 30, process.pid


class ProcessTree:
    """CPU time and memory of a server process and its descendants (a supervisor and
    its workers).

    ``cpu_times()`` has ``user`` and ``system`` like psutil's, summed over the
    tree as it was when this object was made: a process that ends or restarts
    between two readings would make a difference meaningless, so ``changed()``
    tells whether the tree is still the same.
    """

    def __init__(self, root: psutil.Process) -> None:
        self.root = root
        self.processes = [root, *root.children(recursive=True)]
        self.pids = sorted(p.pid for p in self.processes)

    def cpu_times(self) -> "CPUTimes":
        user = system = 0.0
        for process in self.processes:
            try:
                times = process.cpu_times()
            except psutil.Error:
                continue            # gone: changed() reports it
            user += times.user
            system += times.system
        return CPUTimes(user, system)

    def rss(self) -> int:
        """Resident memory summed over the tree, in bytes."""
        total = 0
        for process in self.processes:
            try:
                total += process.memory_info().rss
            except psutil.Error:
                continue
        return total

    def changed(self) -> bool:
        try:
            now = sorted(p.pid for p in [self.root, *self.root.children(recursive=True)])
        except psutil.Error:
            return True
        return now != self.pids


@dataclass
class CPUTimes:
    user: float
    system: float


class ForkingProcess:
    """CPU time and memory of one server process that forks short-lived helpers
    (redis-server: an AOF rewrite, a snapshot), with the ``ProcessTree`` interface.

    ``cpu_times()`` counts the process and its children already reaped (a
    helper's CPU counts once it has ended); ``changed()`` is true only when the
    process itself has ended: a helper coming or going is not a restart.
    """

    def __init__(self, process: psutil.Process) -> None:
        self.root = process
        self.processes = [process]
        self.pids = [process.pid]

    def cpu_times(self) -> CPUTimes:
        try:
            times = self.root.cpu_times()
        except psutil.Error:
            return CPUTimes(0.0, 0.0)     # gone: changed() reports it
        return CPUTimes(times.user + times.children_user, times.system + times.children_system)

    def rss(self) -> int:
        try:
            return self.root.memory_info().rss
        except psutil.Error:
            return 0

    def changed(self) -> bool:
        try:
            return not self.root.is_running() or self.root.status() == psutil.STATUS_ZOMBIE
        except psutil.Error:
            return True


class ProcessGroup:
    """Named parts (each a list of ``ProcessTree`` or ``ForkingProcess``) read as one,
    with the ``ProcessTree`` interface: e.g. the nodes of a service and its redis-servers.

    ``cpu_times()`` sums every part and keeps each part's reading, so that after
    two readings (before and after a phase) ``last_interval()`` splits the
    difference by part, e.g. {"nodes": 1.8, "redis": 0.7} CPU seconds.
    """

    def __init__(self, parts: dict[str, list]) -> None:
        self.parts = parts
        self.processes = [p for trees in parts.values() for tree in trees for p in tree.processes]
        self._readings: list[dict[str, float]] = []

    def cpu_times(self) -> CPUTimes:
        user = system = 0.0
        reading: dict[str, float] = {}
        for name, trees in self.parts.items():
            reading[name] = 0.0
            for tree in trees:
                times = tree.cpu_times()
                user += times.user
                system += times.system
                reading[name] += times.user + times.system
        self._readings = [*self._readings[-1:], reading]
        return CPUTimes(user, system)

    def last_interval(self) -> dict[str, float]:
        """CPU seconds of each part between the last two ``cpu_times()`` readings."""
        if len(self._readings) < 2:
            return {name: 0.0 for name in self.parts}
        before, after = self._readings
        return {name: after[name] - before[name] for name in self.parts}

    def rss(self) -> int:
        return sum(tree.rss() for trees in self.parts.values() for tree in trees)

    def changed(self) -> bool:
        return any(tree.changed() for trees in self.parts.values() for tree in trees)


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection((LOOPBACK, port), timeout=0.5):
            return True
    except OSError:
        return False


# -- client processes -----------------------------------------------------------
class ClientProcesses:
    """Forked client processes, each given the child end of a pipe as its last argument.

    Many sockets need more than one process (the open-files limit is per process)
    and Python clients need more than one core. Every wait is bounded; ``stop()``
    (also on leaving a ``with`` block) sends ``("stop",)`` and joins them, ending
    any that do not stop within a few seconds.
    """

    def __init__(self) -> None:
        import multiprocessing

        self._context = multiprocessing.get_context("fork")
        self.children: list = []
        self.pipes: list = []

    def start(self, target, argument_lists: list[tuple]) -> None:
        """One process per argument tuple: ``target(*arguments, pipe)``."""
        for arguments in argument_lists:
            parent_end, child_end = self._context.Pipe()
            child = self._context.Process(target=target, args=(*arguments, child_end), daemon=True)
            child.start()
            child_end.close()
            self.children.append(child)
            self.pipes.append(parent_end)

    def send_all(self, message: tuple) -> None:
        for pipe in self.pipes:
            pipe.send(message)

    def receive_all(self, timeout: float, what: str) -> list:
        """One message from every process, in order; RuntimeError if one is late."""
        deadline = time.monotonic() + timeout
        messages = []
        for pipe in self.pipes:
            if not pipe.poll(max(0.0, deadline - time.monotonic())):
                raise RuntimeError(f"a client process did not {what} within {timeout:.0f} s")
            messages.append(pipe.recv())
        return messages

    def stop(self) -> None:
        for pipe in self.pipes:
            try:
                pipe.send(("stop",))
            except OSError:
                pass
        for child in self.children:
            child.join(15)
            if child.is_alive():
                child.terminate()
                child.join(5)
        for pipe in self.pipes:
            pipe.close()
        self.children, self.pipes = [], []

    def __enter__(self) -> "ClientProcesses":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


# -- machine and reporting ----------------------------------------------------
def meminfo_kib(name: str) -> int:
    """A /proc/meminfo field in KiB (0 if absent)."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith(name + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def machine() -> dict:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_count": os.cpu_count(),
        "memory_bytes": psutil.virtual_memory().total,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "open_files_limit": soft,
        "open_files_hard_limit": hard,
    }


def print_header(title: str) -> dict:
    info = machine()
    print(f"# {title}")
    print(f"# command: {shlex.join([sys.executable, *sys.argv])}")
    print(f"# machine: nproc={info['nproc']} memory={info['memory_bytes'] / 2**30:.1f} GiB "
          f"kernel={info['kernel']} python={info['python']} "
          f"open-files={info['open_files_limit']}/{info['open_files_hard_limit']}")
    sys.stdout.flush()
    return info


def print_json(result: dict) -> None:
    print(json.dumps(result, sort_keys=True))
    sys.stdout.flush()


def raise_open_files(wanted: int) -> int:
    """Raise this process's soft open-files limit towards ``wanted`` (up to the hard limit)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft


def percentile(sorted_values: list[float], fraction: float) -> float | None:
    """Nearest-rank percentile of an already sorted list (None when empty)."""
    if not sorted_values:
        return None
    rank = math.ceil(fraction * len(sorted_values))  # 1-based
    return sorted_values[min(len(sorted_values), max(1, rank)) - 1]


def latency_figures(found: dict[str, list[float]]) -> dict[str, float]:
    """``NAME_p50_ms`` and ``NAME_p99_ms`` of each sorted list of seconds in ``found``."""
    figures = {}
    for name, latencies in found.items():
        figures[f"{name}_p50_ms"] = percentile(latencies, 0.5) * 1e3
        figures[f"{name}_p99_ms"] = percentile(latencies, 0.99) * 1e3
    return figures


def median_latencies(runs: list[dict[str, float]], what: str) -> dict[str, float]:
    """The median of each figure over ``runs`` (``latency_figures``' dicts), and a
    line printed a name: ``NAME WHAT: p50 ... ms, p99 ... ms``."""
    median = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
    for name in dict.fromkeys(key.rsplit("_", 2)[0] for key in median):
        print(f"{name:9s} {what}: p50 {median[f'{name}_p50_ms']:.2f} ms, p99 {median[f'{name}_p99_ms']:.2f} ms")
    return median


@contextlib.contextmanager
def redis_and_archive():
    """A redis-server and a PostgreSQL of the bench's own (zim.testing: free
    loopback ports, temporary directories, removed at the end), the archive's
    schema migrated: yields ``(redis server, archive DSN, redis-py client)``
    (redis-py: the benches of nodes need the ``redis`` extra anyway)."""
    import redis as redis_py

    from zim.archive.schema import migrate
    from zim.testing.postgres import LocalPostgres
    from zim.testing.redis import LocalRedis
    with LocalRedis() as redis_server, LocalPostgres() as postgres:
        dsn = postgres.create_database("bench")
        migrate(dsn)
        client = redis_py.Redis(host=redis_server.host, port=redis_server.port)
        try:
            yield redis_server, dsn, client
        finally:
            client.close()


def run_main(bench: str, title: str, args, run) -> int:
    """Print the header, call ``run(args, info)``; a failure still ends with a
    RESULT line (and a JSON line with ``--json``) saying why, and exit code 1."""
    info = print_header(title)
    try:
        return run(args, info)
    except (RuntimeError, OSError) as exc:
        print(f"RESULT {bench} FAILED: {exc}")
        if args.json:
            print_json({"bench": bench, "ok": False, "error": str(exc), "machine": info})
        return 1
