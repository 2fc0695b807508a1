"""--memory-release-interval through a real server: each of its processes (the single
process, or the supervisor and every worker) gives its free heap back to the kernel
every S seconds, counted in zim_memory_releases_total; 0 turns it off."""
from __future__ import annotations

import subprocess
import sys
import time

import pytest

from tests.server.test_metrics import start_with_metrics


@pytest.mark.parametrize("workers", [1, 2])
def test_every_process_releases_and_zero_turns_it_off(start_server, workers):
    started = time.monotonic()
    srv, scraper = start_with_metrics(start_server, "--workers", str(workers),
                                      "--memory-release-interval", "1")
    off, off_scraper = start_with_metrics(start_server, "--workers", str(workers),
                                          "--memory-release-interval", "0")
    reactors = 1 if workers == 1 else workers + 1       # the supervisor runs one too

    def enough(got: dict) -> bool:
        releases = got.get(("zim_memory_releases_total", ()), 0)
        # twice each (the interval repeats), and with workers more than the supervisor
        # alone could have made by now (one a second): the workers release too
        return releases >= 2 * reactors and (workers == 1 or releases > time.monotonic() - started + 3)

    got = scraper.wait(enough, f"two releases by each of {reactors} reactors", timeout=15)
    assert got[("zim_memory_release_seconds_total", ())] > 0
    off_got = off_scraper.samples()
    assert off_got[("zim_memory_releases_total", ())] == 0
    assert off_got[("zim_memory_release_seconds_total", ())] == 0


def test_a_bad_interval_is_refused(zim_env):
    for bad in ("-1", "86401", "soon"):
        done = subprocess.run([sys.executable, "-m", "zim", "--memory-release-interval", bad],
                              env=zim_env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 2, (bad, done.stderr)
        assert "--memory-release-interval" in done.stderr
