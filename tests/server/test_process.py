"""Helper processes run the parent's zim whatever the current directory; restarts back off;
closes are logged in aggregate."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from zim.closelog import CloseLog
from zim.process import EXIT_IMPORT_FAILED, PACKAGE_ROOT, Backoff, exit_reason, helper_command

PROBE = "import zim, sys; print(zim.__file__); print(sys.argv[1:]); sys.exit(7)"


def decoy_tree(directory: Path) -> None:
    """A directory holding a ``zim`` package that is not the real one (an unbuilt checkout)."""
    (directory / "zim").mkdir()
    (directory / "zim" / "__init__.py").write_text("raise ImportError('the decoy zim was imported')\n")


def test_python_dash_m_in_a_checkout_imports_the_tree_there(tmp_path):
    """Why helper_command exists: ``python -m`` puts the current directory first."""
    decoy_tree(tmp_path)
    result = subprocess.run([sys.executable, "-m", "zim.worker", "--help"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode != 0 and "the decoy zim was imported" in result.stderr


def test_helper_command_runs_the_parents_zim_from_any_directory(tmp_path):
    decoy_tree(tmp_path)
    result = subprocess.run(helper_command("zim.worker", "--help"), cwd=tmp_path,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert "a zim worker" in result.stdout                  # its argparse description
    assert str(Path(PACKAGE_ROOT)) != str(tmp_path)


def test_helper_command_passes_arguments_and_the_exit_status(tmp_path):
    script = tmp_path / "probe_module.py"
    script.write_text(PROBE)
    # a module outside zim is found on the rest of the path (here: PYTHONPATH)
    result = subprocess.run(helper_command("probe_module", "--flag", "a b"), cwd="/", capture_output=True, text=True,
                            timeout=30, env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 7, result.stderr
    where, argv = result.stdout.strip().splitlines()
    assert where.startswith(PACKAGE_ROOT) and argv == "['--flag', 'a b']"


def test_a_helper_that_cannot_import_says_why_in_one_line(tmp_path):
    result = subprocess.run(helper_command("zim.no_such_module"), cwd=tmp_path, capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == EXIT_IMPORT_FAILED
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("zim: zim.no_such_module cannot start: ImportError"), lines
    assert exit_reason(EXIT_IMPORT_FAILED).startswith("could not import its code")
    assert exit_reason(-9) == "killed by SIGKILL" and exit_reason(1) == "exit status 1"


def test_backoff_doubles_for_failures_at_start_and_resets_after_a_good_run():
    backoff = Backoff(first=0.5, most=4.0, quick=2.0)
    assert [backoff.after_exit(0.1) for _ in range(7)] == [0.0, 0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert backoff.failures == 7
    assert backoff.after_exit(60.0) == 0.0 and backoff.failures == 0
    assert [backoff.after_exit(1.0) for _ in range(2)] == [0.0, 0.5]


def test_close_log_writes_one_line_per_reason_per_interval(caplog):
    now = [100.0]
    close_log = CloseLog("worker 1", clock=lambda: now[0], interval=10.0)
    with caplog.at_level("WARNING", logger="zim.closes"):
        close_log({"closed_peer": 50, "closed_idle_timeout": 3})
        assert [r.getMessage() for r in caplog.records] == [
            "worker 1: 3 connections closed (idle_timeout: silent for --idle-timeout), 3 in all"]
        for second in range(1, 10):             # more closes within the interval: no line
            now[0] = 100.0 + second
            close_log({"closed_idle_timeout": 3 + second, "closed_fd_limit": 0})
        assert len(caplog.records) == 1
        now[0] = 110.0
        close_log({"closed_idle_timeout": 40, "closed_too_large": 1})
        assert [r.getMessage() for r in caplog.records[1:]] == [
            "worker 1: 37 connections closed (idle_timeout: silent for --idle-timeout) in the last 10 s, 40 in all",
            "worker 1: 1 connections closed (too_large: sent a packet over --max-packet), 1 in all"]
        now[0] = 111.0
        close_log({"closed_idle_timeout": 41, "closed_too_large": 1}, final=True)
        assert caplog.records[-1].getMessage().startswith("worker 1: 1 connections closed (idle_timeout")
        assert len(caplog.records) == 4         # peer closes are never logged
