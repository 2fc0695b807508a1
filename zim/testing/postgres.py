"""A throwaway PostgreSQL on a free loopback port, for tests and benches.

``LocalPostgres`` runs ``initdb`` in a temporary directory (trust
authentication, superuser ``zim``), then ``postgres`` on ``127.0.0.1:port``
with a Unix socket directory of its own, and removes everything at ``close()``.
``kill()`` SIGKILLs the postmaster and its backends at once (a crash),
``start()``/``restart()`` bring it back on the same port and data directory
(crash recovery replays its WAL). ``create_database(name)`` gives a DSN to a
new, empty database (one per test that needs a blank schema).

PostgreSQL refuses to run as root: when this process is root, the data
directory is given to the unprivileged ``postgres`` user (Debian's package
creates it) and the binaries run as that user (``setpriv``, which execs, so the
process we hold is the postmaster itself).
"""
from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time

from zim.testing.ports import LOOPBACK, free_loopback_port

SUPERUSER = "zim"
UNPRIVILEGED_USER = "postgres"      # whom the server runs as when we are root
START_TIMEOUT = 30.0


def postgres_bin_dir() -> str | None:
    """The directory holding initdb and postgres: Debian's newest
    ``/usr/lib/postgresql/VERSION/bin``, else the one of ``initdb`` on PATH;
    None when PostgreSQL is not installed."""
    def version(path: str) -> float:
        try:
            return float(path.split("/")[-2])
        except ValueError:
            return 0.0
    for directory in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=version, reverse=True):
        if os.access(os.path.join(directory, "initdb"), os.X_OK):
            return directory
    initdb = shutil.which("initdb")
    return os.path.dirname(os.path.realpath(initdb)) if initdb else None


def _run_as() -> list[str]:
    """The command prefix that drops root to UNPRIVILEGED_USER (empty when not root)."""
    if os.geteuid() != 0:
        return []
    try:
        pwd.getpwnam(UNPRIVILEGED_USER)
    except KeyError:
        raise RuntimeError(f"running as root and there is no {UNPRIVILEGED_USER!r} user to run "
                           "PostgreSQL as (apt-get install postgresql creates it)") from None
    return ["setpriv", f"--reuid={UNPRIVILEGED_USER}", f"--regid={UNPRIVILEGED_USER}", "--init-groups", "--"]


class LocalPostgres:
    """One PostgreSQL server on ``127.0.0.1:port``; see the module docstring."""

    def __init__(self, port: int | None = None) -> None:
        bin_dir = postgres_bin_dir()
        if bin_dir is None:
            raise RuntimeError("PostgreSQL is not installed (apt-get install postgresql)")
        self.bin_dir = bin_dir
        self.port = port or free_loopback_port()
        self.host = LOOPBACK
        self._dir = tempfile.TemporaryDirectory(prefix="zim-postgres-")
        self.data_dir = os.path.join(self._dir.name, "data")
        self.socket_dir = os.path.join(self._dir.name, "sockets")
        self.log_path = os.path.join(self._dir.name, "postgres.log")
        self.process: subprocess.Popen | None = None
        self._prefix = _run_as()
        self._initialized = False

    def dsn(self, database: str = "postgres") -> str:
        """The libpq URI of ``database`` as the superuser (trust authentication)."""
        return f"postgresql://{SUPERUSER}@{self.host}:{self.port}/{database}"

    @property
    def url(self) -> str:
        return self.dsn()

    def _initdb(self) -> None:
        os.makedirs(self.socket_dir)
        if self._prefix:
            user = pwd.getpwnam(UNPRIVILEGED_USER)
            for path in (self._dir.name, self.socket_dir):
                os.chown(path, user.pw_uid, user.pw_gid)
        done = subprocess.run(
            [*self._prefix, os.path.join(self.bin_dir, "initdb"), "-D", self.data_dir, "-U", SUPERUSER,
             "-A", "trust", "-E", "UTF8", "--locale=C", "--no-sync"],
            capture_output=True, timeout=120)
        if done.returncode:
            raise RuntimeError(f"initdb failed: {done.stderr.decode(errors='replace')[-2000:]}")
        self._initialized = True

    def start(self, timeout: float = START_TIMEOUT) -> "LocalPostgres":
        """Start the server (initdb first, the first time) and wait until it accepts connections."""
        if not self._initialized:
            self._initdb()
        log = open(self.log_path, "ab")
        # fsync off: a test kills the processes, never the machine, so the page cache keeps
        # every commit; a new session group, so kill() takes the backends down with it
        self.process = subprocess.Popen(
            [*self._prefix, os.path.join(self.bin_dir, "postgres"), "-D", self.data_dir, "-p", str(self.port),
             "-k", self.socket_dir, "-c", f"listen_addresses={LOOPBACK}", "-c", "fsync=off",
             "-c", "full_page_writes=off", "-c", "max_connections=50"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout
        while not self.accepts_connections():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"postgres on port {self.port} did not start: {self.log_tail()}")
            time.sleep(0.05)
        return self

    def accepts_connections(self) -> bool:
        """Whether a connection to the default database succeeds (a blocking probe)."""
        from psycopg import pq
        conn = pq.PGconn.connect(f"{self.dsn()}?connect_timeout=1".encode())
        try:
            return conn.status == pq.ConnStatus.OK
        finally:
            conn.finish()

    def execute(self, sql: str, database: str = "postgres") -> list[tuple]:
        """Run ``sql`` (blocking, autocommit) and return its rows as text tuples."""
        from psycopg import pq

        from zim.archive.schema import execute_blocking
        conn = pq.PGconn.connect(self.dsn(database).encode())
        try:
            if conn.status != pq.ConnStatus.OK:
                raise RuntimeError(conn.get_error_message())
            return execute_blocking(conn, sql)
        finally:
            conn.finish()

    def create_database(self, name: str) -> str:
        """Create an empty database (``name``: letters, digits, _) and return its DSN."""
        if not name.replace("_", "").isalnum():
            raise ValueError(f"a database name of letters, digits and _: {name!r}")
        self.execute(f'CREATE DATABASE "{name}"')
        return self.dsn(name)

    def pid(self) -> int:
        return self.process.pid if self.process else 0

    def kill(self) -> None:
        """SIGKILL the postmaster and every backend (its session group), and reap it."""
        if self.process is not None and self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.process.wait(10)

    def restart(self, down_for: float = 0.5) -> None:
        """kill -9, then start again on the same port and data directory."""
        self.kill()
        time.sleep(down_for)
        self.start()

    def close(self) -> None:
        """Stop the server and remove its directory."""
        self.kill()
        self._dir.cleanup()

    def log_tail(self, size: int = 2000) -> str:
        try:
            with open(self.log_path, "rb") as log:
                return log.read()[-size:].decode(errors="replace")
        except OSError:
            return ""

    def __enter__(self) -> "LocalPostgres":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()
