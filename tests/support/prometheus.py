"""A real Prometheus server for tests: Debian's ``prometheus`` binary, scraping
targets on loopback every second.

``start_prometheus(directory, targets)`` starts one and returns a handle
(``query``, ``wait_for``, ``targets``, ``stop``); the ``prometheus`` fixture is
a factory that stops every server it started at the end of the test:

    def test_scraped(prometheus):
        prom = prometheus(["127.0.0.1:9100"])
        prom.wait_for('zim_connections_accepted_total', lambda v: v == 7)

Without the binary, ``require_prometheus()`` skips the test, saying why, or
fails it when the environment says ``CI=true`` (CI must install it:
``apt-get install prometheus``).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Callable, Iterator, Sequence

import pytest

from zim.testing.ports import free_loopback_port

HOST = "127.0.0.1"
READY_TIMEOUT = 30.0
QUERY_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0


def prometheus_binary() -> str | None:
    """The ``prometheus`` executable on PATH (``/usr/bin/prometheus`` from Debian), or None."""
    return shutil.which("prometheus")


def require_prometheus() -> str:
    """The binary's path; without it, skip the test, or fail it under ``CI=true``."""
    binary = prometheus_binary()
    if binary is None:
        message = "prometheus is not installed (apt-get install prometheus; CI installs it)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{message}: under CI=true it must be installed")
        pytest.skip(message)
    return binary


class Prometheus:
    """A running Prometheus: its HTTP API on ``url``, its log in ``log_path``."""

    def __init__(self, proc: subprocess.Popen, port: int, directory: Path, log_path: Path) -> None:
        self.proc = proc
        self.port = port
        self.url = f"http://{HOST}:{port}"
        self.directory = directory
        self.log_path = log_path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def _get(self, path: str, params: dict[str, str] | None = None) -> dict:
        url = self.url + path + ("?" + urllib.parse.urlencode(params) if params else "")
        with urllib.request.urlopen(url, timeout=10) as answer:
            return json.loads(answer.read())

    def query(self, expr: str) -> list[dict]:
        """An instant query's result: a list of ``{"metric": {labels}, "value": [t, "v"]}``."""
        reply = self._get("/api/v1/query", {"query": expr})
        if reply.get("status") != "success":
            raise AssertionError(f"query {expr!r} failed: {reply}")
        return reply["data"]["result"]

    def values(self, expr: str) -> list[float]:
        """The values of an instant query's series, as floats."""
        return [float(series["value"][1]) for series in self.query(expr)]

    def wait_for(self, expr: str, check: Callable[[list[float]], bool] = bool,
                 timeout: float = QUERY_TIMEOUT) -> list[float]:
        """Query ``expr`` until ``check(values)`` holds (by default: some series
        exist) and return the values; fail after ``timeout`` seconds with what
        was seen last and the scrape targets' state."""
        deadline = time.monotonic() + timeout
        seen: list[float] = []
        while True:
            seen = self.values(expr)
            if check(seen):
                return seen
            if time.monotonic() > deadline:
                raise AssertionError(f"prometheus: {expr!r} still {seen} after {timeout} s; "
                                     f"targets: {self.targets()}")
            if self.proc.poll() is not None:
                raise AssertionError(f"prometheus exited ({self.proc.returncode}):\n{self.log()[-3000:]}")
            time.sleep(0.2)

    def targets(self) -> list[dict]:
        """The active scrape targets: ``health``, ``lastError``, ``scrapeUrl``..."""
        return self._get("/api/v1/targets")["data"]["activeTargets"]

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after STOP_TIMEOUT seconds (idempotent)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _config(targets: Sequence[str], job: str, scrape_interval: str, metrics_path: str) -> str:
    # JSON is YAML: no YAML library needed
    return json.dumps({
        "global": {"scrape_interval": scrape_interval, "scrape_timeout": scrape_interval,
                   "evaluation_interval": scrape_interval},
        "scrape_configs": [{"job_name": job, "metrics_path": metrics_path,
                            "static_configs": [{"targets": list(targets)}]}],
    }, indent=2)


def start_prometheus(directory: Path, targets: Sequence[str], *, job: str = "zim",
                     scrape_interval: str = "1s", metrics_path: str = "/metrics",
                     ready_timeout: float = READY_TIMEOUT) -> Prometheus:
    """Start Prometheus scraping ``targets`` (``"HOST:PORT"`` each) as job ``job``
    every ``scrape_interval``, its config, data and log under ``directory``,
    its API on a free loopback port; return once ``/-/ready`` answers 200.
    Skips or fails (``require_prometheus``) without the binary."""
    binary = require_prometheus()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = directory / "prometheus.yml"
    config.write_text(_config(targets, job, scrape_interval, metrics_path))
    last_log = ""
    for _attempt in range(3):       # a free port may be taken before Prometheus binds it
        port = free_loopback_port()
        data = directory / f"data-{port}"
        log_path = directory / f"prometheus-{port}.log"
        with open(log_path, "wb") as log_file:
            proc = subprocess.Popen(
                [binary, f"--config.file={config}", f"--storage.tsdb.path={data}",
                 f"--web.listen-address={HOST}:{port}", "--log.level=warn"],
                stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=str(directory))
        server = Prometheus(proc, port, directory, log_path)
        deadline = time.monotonic() + ready_timeout
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{server.url}/-/ready", timeout=2) as answer:
                    if answer.status == 200:
                        return server
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            time.sleep(0.1)
        server.stop()
        last_log = server.log()
        if "address already in use" not in last_log:
            break
    raise AssertionError(f"prometheus did not become ready:\n{last_log[-3000:]}")


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[Callable[..., Prometheus]]:
    """A factory: ``prometheus(targets, **options)`` starts one (``start_prometheus``
    under ``tmp_path``); all are stopped at the end of the test."""
    started: list[Prometheus] = []

    def start(targets: Sequence[str], **options) -> Prometheus:
        server = start_prometheus(tmp_path / f"prometheus-{len(started)}", targets, **options)
        started.append(server)
        return server

    try:
        yield start
    finally:
        for server in started:
            server.stop()
