"""Fixtures: real zim server processes on free loopback ports.

``server`` is one shared server for the session (default flags); tests that
need flags, a custom app script, a restart or a private process use
``start_server``. Every server is stopped with SIGTERM at the end and must
exit within 5 s with status 0 and no traceback in its stderr (except the
ones a test announces via ``allowed_tracebacks``).
"""
from __future__ import annotations

import os
import sys
import textwrap
import uuid
from pathlib import Path
from typing import Callable, Iterator, Sequence

import pytest

from tests.support.client import RawWs, TcpClient, WsClient, ZimClient, unique  # noqa: F401
from tests.support.servers import HOST, ServerProcess, free_port, server_env, stop_servers  # noqa: F401


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
