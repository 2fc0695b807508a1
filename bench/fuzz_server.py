"""The server under bench/fuzz.py, watched from outside: its process tree
and their roles, open descriptors, resident memory, the problems and closes
its log reports, and stopping it (SIGTERM once, then the exit status and log).
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import time

import psutil

import benchlib


# -- the server's state -------------------------------------------------------------------
def tree(root: psutil.Process) -> list[psutil.Process]:
    return [root, *root.children(recursive=True)]


def fd_counts(pids: list[int]) -> dict[int, int | None]:
    counts = {}
    for pid in pids:
        try:
            counts[pid] = len(os.listdir(f"/proc/{pid}/fd"))
        except OSError:
            counts[pid] = None
    return counts


def is_alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def rss_of(pids: list[int]) -> dict[int, int]:
    out = {}
    for pid in pids:
        try:
            out[pid] = psutil.Process(pid).memory_info().rss
        except psutil.Error:
            out[pid] = 0
    return out


def role(process: psutil.Process) -> str:
    try:
        command = process.cmdline()
    except psutil.Error:
        return "gone"
    if "zim.worker" in command:
        try:
            return f"worker{command[command.index('--index') + 1]}"
        except (ValueError, IndexError):
            return "worker"
    if "zim.storage.writer" in command:
        return "writer"
    if "-m" in command and "zim" in command:
        return "router"
    return os.path.basename(command[0]) if command else "?"


LOG_PROBLEMS = re.compile(r"Traceback|restarting|ended \(| ERROR | CRITICAL |link to worker \d+ closed|"
                          r"Segmentation|core dumped|MemoryError")
CLOSES = re.compile(r"^\S+ \S+ zim\.closes\S* WARNING (\S+): \d+ connections closed \((\w+):.*, (\d+) in all")


def first_death_in_log(problems: list[str]) -> float | None:
    """When the log first says a server process ended (its own timestamp, local time)."""
    for line in problems:
        if "ended (" in line or "restarting" in line:
            try:
                stamp, _, millis = " ".join(line.split()[:2]).partition(",")
                return time.mktime(time.strptime(stamp, "%Y-%m-%d %H:%M:%S")) + int(millis) / 1000
            except ValueError:
                continue
    return None


def stop_server(server: benchlib.Server, timeout: float = 20.0) -> tuple[int | None, str]:
    """SIGTERM once; the exit status and the whole log. Then the usual cleanup."""
    code = None
    log = ""
    process = server.process
    if process is not None and process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            code = process.wait(timeout)
        except subprocess.TimeoutExpired:
            code = None
    elif process is not None:
        code = process.returncode
    if server._log is not None:
        server._log.flush()
        server._log.seek(0)
        log = server._log.read().decode("utf-8", "replace")
    server.stop()
    return code, log
