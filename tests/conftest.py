"""Fixtures: real zim server processes on free loopback ports.

``server`` is one shared server for the session (default flags); tests that
need flags, a custom app script, a restart or a private process use
``start_server``. Every server is stopped with SIGTERM at the end and must
exit within 5 s with status 0 and no traceback in its stderr (except the
ones a test announces via ``allowed_tracebacks``).
"""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path
from typing import Callable, Iterator, Sequence

import pytest

# the test helpers, and this checkout's zim even when it is not installed (plain ``pytest``)
sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from zimclient import RawWs, TcpClient, WsClient, ZimClient, unique  # noqa: E402,F401

HOST = "127.0.0.1"
REPO_ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT = 15.0
STOP_TIMEOUT = 5.0


def server_env() -> dict[str, str]:
    """The environment for a server process: this checkout first on the path, so the
    server runs this tree even when zim is not installed."""
    python_path = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    return dict(os.environ, PYTHONUNBUFFERED="1", PYTHONFAULTHANDLER="1", PYTHONPATH=python_path)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


class ServerProcess:
    """One running server process and the clients opened against it."""

    def __init__(self, args: Sequence[str], data_dir: Path, tcp_port: int, ws_port: int,
                 log_dir: Path, allowed_tracebacks: Sequence[str] = ()) -> None:
        self.host = HOST
        self.tcp_port = tcp_port
        self.ws_port = ws_port
        self.data_dir = data_dir
        self.allowed_tracebacks = list(allowed_tracebacks)
        name = f"server-{tcp_port}-{uuid.uuid4().hex[:6]}"
        self.stderr_path = log_dir / f"{name}.stderr"
        self.stdout_path = log_dir / f"{name}.stdout"
        self.clients: list[ZimClient | RawWs] = []
        with open(self.stderr_path, "wb") as err, open(self.stdout_path, "wb") as out:
            self.proc = subprocess.Popen(list(args), stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                         cwd=str(log_dir), env=server_env())
        self.stopped = False

    @property
    def tcp(self) -> tuple[str, int]:
        return (self.host, self.tcp_port)

    @property
    def ws(self) -> tuple[str, int]:
        return (self.host, self.ws_port)

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def wait_ready(self) -> None:
        """Both ports accept connections, or fail with the server's stderr."""
        deadline = time.monotonic() + START_TIMEOUT
        pending = {self.tcp_port, self.ws_port}
        while pending:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode} at startup:\n{self.stderr()}")
            if time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"server ports {pending} not accepting after {START_TIMEOUT}s:\n"
                                     f"{self.stderr()}")
            for port in list(pending):
                try:
                    socket.create_connection((HOST, port), timeout=0.2).close()
                    pending.discard(port)
                except OSError:
                    pass
            if pending:
                time.sleep(0.05)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def assert_alive(self) -> None:
        assert self.alive(), f"server died with {self.proc.returncode}:\n{self.stderr()[-4000:]}"

    # -- clients ----------------------------------------------------------
    def _track(self, client):
        self.clients.append(client)
        return client

    def tcp_client(self, timeout: float = 5.0) -> TcpClient:
        return self._track(TcpClient(HOST, self.tcp_port, timeout))

    def ws_client(self, timeout: float = 5.0, **kwargs) -> WsClient:
        return self._track(WsClient(HOST, self.ws_port, timeout, **kwargs))

    def client(self, kind: str, timeout: float = 5.0, **kwargs) -> ZimClient:
        return self.tcp_client(timeout) if kind == "tcp" else self.ws_client(timeout, **kwargs)

    def raw_ws(self, timeout: float = 5.0) -> RawWs:
        return self._track(RawWs(HOST, self.ws_port, timeout))

    def raw_tcp(self, timeout: float = 5.0) -> socket.socket:
        sock = socket.create_connection(self.tcp, timeout=timeout)
        self.clients.append(sock)
        return sock

    def close_clients(self) -> None:
        for client in self.clients:
            try:
                client.close()
            except Exception:
                pass
        self.clients.clear()

    # -- stopping ---------------------------------------------------------
    def kill(self) -> None:
        """SIGKILL (if still running); a killed server is not checked at the end."""
        self.stopped = True
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)

    def stop(self, signum: int = signal.SIGTERM, what: str = "at the end of the test") -> None:
        """Close the clients, then signal; the server must exit 0 within 5 s and leave
        no traceback. Stopping twice is a no-op."""
        if self.stopped:
            return
        self.close_clients()
        self.signal_and_check(signum, what)

    def signal_and_check(self, signum: int = signal.SIGTERM, what: str = "") -> None:
        """Send ``signum`` now (clients stay as they are) and check the exit. The process
        is killed if it outlives the timeout, so no test leaves a server behind."""
        self.stopped = True
        name = signal.Signals(signum).name
        if self.proc.poll() is not None:
            raise AssertionError(f"server had already exited with {self.proc.returncode}:\n"
                                 f"{self.stderr()[-4000:]}")
        self.proc.send_signal(signum)
        try:
            code = self.proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"server did not exit within {STOP_TIMEOUT}s of {name} sent {what}:\n"
                                 f"{self.stderr()[-4000:]}") from None
        text = self.stderr()
        assert code == 0, f"server exited with {code} after {name}:\n{text[-4000:]}"
        self.check_stderr(text)

    def check_stderr(self, text: str) -> None:
        assert "Fatal Python error" not in text, text[-4000:]
        blocks = text.split("Traceback (most recent call last):")[1:]
        for block in blocks:
            assert any(marker in block for marker in self.allowed_tracebacks), \
                f"unexpected traceback in server stderr:\nTraceback{block[:3000]}"


@pytest.fixture(scope="session")
def _logs(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("zim-logs")


# Every test client comes from 127.0.0.1 and most tests make users, send and read as
# fast as they can: the per-address and per-user rate limits are off for the servers
# they start, unless a test asks for the defaults (``default_limits=True``; the
# limits' own tests: test_abuse_limits.py, test_conn_limits.py). A flag a test
# gives comes later on the command line, so it wins.
TEST_LIMITS = ("--user-rate", "0", "--max-conns-per-address", "0", "--address-login-rate", "0",
               "--address-new-user-rate", "0", "--address-auth-failure-rate", "0", "--channel-create-rate", "0",
               "--ack-rate", "0", "--read-rate", "0")


def _launch(tmp_path_factory, log_dir: Path, flags: Sequence[str] = (), app_script: str | None = None,
            data_dir: Path | None = None, allowed_tracebacks: Sequence[str] = (),
            wait: bool = True, default_limits: bool = False) -> ServerProcess:
    tcp_port, ws_port = free_port(), free_port()
    while ws_port == tcp_port:
        ws_port = free_port()
    data_dir = data_dir or tmp_path_factory.mktemp("zim-data")
    if app_script is None:
        args = [sys.executable, "-m", "zim", "--tcp", f"{HOST}:{tcp_port}", "--ws", f"{HOST}:{ws_port}",
                "--data", str(data_dir), *(() if default_limits else TEST_LIMITS), *flags]
    else:
        script = log_dir / f"app_{uuid.uuid4().hex[:8]}.py"
        script.write_text(textwrap.dedent(app_script))
        args = [sys.executable, str(script), f"{HOST}:{tcp_port}", f"{HOST}:{ws_port}", str(data_dir), *flags]
    server = ServerProcess(args, Path(data_dir), tcp_port, ws_port, log_dir, allowed_tracebacks)
    if wait:
        server.wait_ready()
    return server


@pytest.fixture(scope="session", params=["1", "3"], ids=["1-worker", "3-workers"])
def server(request, tmp_path_factory, _logs) -> Iterator[ServerProcess]:
    """The shared server, fresh data directory: every test that uses it runs against
    a single-process server and against a supervisor with 3 workers."""
    # no channel rate limit: protocol tests send bursts (the limits: test_traffic_limits.py)
    srv = _launch(tmp_path_factory, _logs, flags=("--workers", request.param, "--channel-rate", "0"))
    try:
        yield srv
        srv.stop()
    finally:
        srv.kill()


StartServer = Callable[..., ServerProcess]


class ServerFactory:
    """``factory(flags=(...), app_script=None, data_dir=None, allowed_tracebacks=(),
    default_limits=False)`` (``TEST_LIMITS``: rate limits off unless ``default_limits``).

    ``app_script`` is Python source run as ``python script.py TCP WS DATA``; it
    reads its addresses from ``sys.argv[1:4]``. ``finish()`` stops and checks
    every server still running.
    """

    def __init__(self, tmp_path_factory, log_dir: Path) -> None:
        self.tmp_path_factory = tmp_path_factory
        self.log_dir = log_dir
        self.started: list[ServerProcess] = []

    def __call__(self, flags: Sequence[str] = (), app_script: str | None = None,
                 data_dir: Path | None = None, allowed_tracebacks: Sequence[str] = (),
                 wait: bool = True, default_limits: bool = False) -> ServerProcess:
        srv = _launch(self.tmp_path_factory, self.log_dir, flags, app_script, data_dir,
                      allowed_tracebacks, wait, default_limits)
        self.started.append(srv)
        return srv

    def finish(self) -> None:
        stop_servers(self.started)


def stop_servers(servers: Sequence[ServerProcess]) -> None:
    """Stop and check every server; whatever a test did with one, none outlives this."""
    errors = []
    for srv in servers:
        try:
            srv.stop()
        except AssertionError as exc:
            errors.append(str(exc))
        finally:
            srv.close_clients()
            srv.kill()
    assert not errors, "\n\n".join(errors)


@pytest.fixture
def start_server(tmp_path_factory, _logs) -> Iterator[StartServer]:
    """Start servers with custom flags or app scripts for one test."""
    factory = ServerFactory(tmp_path_factory, _logs)
    yield factory
    factory.finish()


@pytest.fixture(scope="module")
def start_module_server(tmp_path_factory, _logs) -> Iterator[StartServer]:
    """Like ``start_server``, the servers living for the whole test module."""
    factory = ServerFactory(tmp_path_factory, _logs)
    yield factory
    factory.finish()


@pytest.fixture
def zim_env() -> dict[str, str]:
    """Environment for running ``python -m zim`` by hand (CLI tests)."""
    return server_env()


@pytest.fixture(params=["tcp", "ws"])
def transport(request) -> str:
    return request.param


@pytest.fixture
def connect(server, transport) -> Iterator[Callable[..., ZimClient]]:
    """``connect()`` opens a client of this test's transport on the shared server;
    ``connect("tcp")``/``connect("ws")`` picks one. Closed after the test."""
    opened: list[ZimClient] = []

    def make(kind: str | None = None, timeout: float = 5.0) -> ZimClient:
        client = (TcpClient if (kind or transport) == "tcp" else WsClient)(
            HOST, server.tcp_port if (kind or transport) == "tcp" else server.ws_port, timeout)
        opened.append(client)
        return client

    yield make
    for client in opened:
        client.close()
    server.assert_alive()


@pytest.fixture
def user(connect) -> Callable[..., ZimClient]:
    """``user(name=None, kind=None)``: a connected, logged-in client."""

    def make(name: str | None = None, kind: str | None = None) -> ZimClient:
        client = connect(kind)
        client.login(name or unique("u"))
        return client

    return make


MISSING_SERVICE = "is not installed"    # the words of every skip for a missing service binary


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under CI=true a test skipped for a missing service (redis-server, prometheus ...)
    fails instead: CI installs them all (.ci/run), so a skip there hides a broken install."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and os.environ.get("CI") == "true":
        reason = str(report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr)
        if MISSING_SERVICE in reason:
            report.outcome = "failed"
            report.longrepr = f"CI=true and a service the test needs is missing: {reason}"


@contextlib.contextmanager
def durable_store_on_a_test_link(directory) -> Iterator:
    """A DurableStore in ``directory`` whose writer link is a socketpair nobody serves,
    on a reactor that never runs: the test plays the writer, feeding its answers to
    ``store.on_link_packet``."""
    import socket as socket_module

    from zim._core import Reactor
    from zim.storage.durable import DurableStore

    store = DurableStore(str(directory))
    reactor = Reactor(65536, lambda *packet: None)
    ours, theirs = socket_module.socketpair()
    store.reactor = reactor
    store.link = reactor.adopt_link(ours.detach())
    try:
        yield store
    finally:
        reactor.close_all()
        theirs.close()
        store.close()
