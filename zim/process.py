"""zim's processes: how zim starts its helpers, ties them to their parent, restarts them, and stops.

Every process zim starts (the workers, the store writer) must run the same ``zim``
its parent imported. ``python -m zim.worker`` does not promise that: ``-m`` puts the
current directory first on ``sys.path``, so a server started from a source checkout
(``pip install . && zim-server`` at the repository root) would give its helpers the
unbuilt tree there instead of the installed package. ``helper_command`` starts the
module through ``zim/_start_helper.py``, run by its path, which puts the directory of
the parent's package first instead.
"""
from __future__ import annotations

import ctypes
import os
import resource
import signal
import sys
from typing import Callable

# The directory holding the ``zim`` package this process runs (this file is zim/process.py;
# not ``import zim``, which would import the whole framework into a helper's start)
PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Exit status of a helper that could not import its code (zim/_start_helper.py)
EXIT_IMPORT_FAILED = 3


def helper_command(module: str, *args: str) -> list[str]:
    """The command line running ``python -m module args...`` on this process's ``zim``,
    whatever the current directory (zim/_start_helper.py)."""
    return [sys.executable, os.path.join(PACKAGE_ROOT, "zim", "_start_helper.py"), module, *args]


def exit_reason(returncode: int | None) -> str:
    """A few words for how a helper ended, for the one log line about it."""
    if returncode is None:
        return "still running"
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    if returncode == EXIT_IMPORT_FAILED:
        return "could not import its code (the line above says what)"
    return f"exit status {returncode}"


class Backoff:
    """Restart delays for a helper that keeps dying soon after its start.

    A death within ``quick`` seconds of the start counts as a failure at start. The
    first one restarts at once (a helper killed by accident comes straight back);
    each further one in a row doubles the delay, from ``first`` up to ``most``
    seconds. A helper that lived longer restarts at once.
    """

    def __init__(self, first: float = 0.5, most: float = 30.0, quick: float = 2.0) -> None:
        self.first = first
        self.most = most
        self.quick = quick
        self.failures = 0       # failures at start in a row

    def after_exit(self, lived: float) -> float:
        """Seconds to wait before the next start, given how long the last one lived."""
        if lived >= self.quick:
            self.failures = 0
            return 0.0
        self.failures += 1
        if self.failures == 1:
            return 0.0
        return min(self.most, self.first * (2 ** (self.failures - 2)))


PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int) -> None:
    """SIGTERM this process when its parent dies, even by SIGKILL (no orphans)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent_pid:          # it died before the prctl took effect
        sys.exit(0)


# descriptors a serving process keeps for itself: epoll, listeners, the reserve, links, logs
RESERVED_FDS = 32


def connection_ceiling(serving_processes: int) -> tuple[int, int]:
    """(open-files limit of one process, connections the serving processes can hold)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft, serving_processes * max(0, soft - RESERVED_FDS)


class stop_on_signals:
    """``with stop_on_signals(callback):`` SIGTERM and SIGINT call ``callback()``."""

    def __init__(self, callback: Callable[[], None]) -> None:
        self.callback = callback
        self.old: dict = {}

    def _handle(self, signum, frame) -> None:
        self.callback()

    def __enter__(self) -> "stop_on_signals":
        self.old = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGINT)}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self.old.items():
            signal.signal(sig, handler)
