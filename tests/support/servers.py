"""Real zim server processes for tests: start one on free loopback ports, talk to
it, stop it and check it ended cleanly (the fixtures in tests/conftest.py use these)."""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path
from typing import Iterator, Sequence

from tests.support import REPO_ROOT
from tests.support.client import RawWs, TcpClient, WsClient, ZimClient
from zim.testing.ports import free_loopback_port as free_port  # noqa: F401  (the tests' name)

HOST = "127.0.0.1"
START_TIMEOUT = 15.0
STOP_TIMEOUT = 5.0


def server_env() -> dict[str, str]:
    """The environment for a server process: this checkout first on the path, so the
    server runs this tree even when zim is not installed."""
    python_path = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    return dict(os.environ, PYTHONUNBUFFERED="1", PYTHONFAULTHANDLER="1", PYTHONPATH=python_path)


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
