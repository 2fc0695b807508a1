"""The JavaScript client (clients/js) under Node's own test runner, against real servers the
Node tests start (clients/js/test-support/server.js runs ``python -m zim`` of this checkout).

Needs ``node`` (20+) and the ``ws`` package installed in clients/js (``npm ci`` there; .ci/run
does it). Without them the test is skipped, except under CI=true, where it fails
(tests/conftest.py). A Node test whose server feature is missing (JWT logins, TCP
compression) skips itself, and fails under CI=true.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from tests.conftest import MISSING_SERVICE
from tests.support import REPO_ROOT
from tests.support.servers import server_env

JS = REPO_ROOT / "clients" / "js"


def test_node_tests_of_the_js_client_pass():
    node = shutil.which("node")
    if node is None:
        pytest.skip(f"node {MISSING_SERVICE}")
    if not (JS / "node_modules" / "ws").is_dir():
        pytest.skip(f"the ws package {MISSING_SERVICE} in clients/js (run `npm ci` there)")
    env = dict(server_env(), ZIM_PYTHON=sys.executable)
    result = subprocess.run([node, "--test", "--test-reporter=spec", "test/"], cwd=str(JS), env=env,
                            capture_output=True, text=True, timeout=240)
    report = result.stdout + result.stderr
    assert result.returncode == 0, f"node --test failed ({result.returncode}):\n{report[-8000:]}"
    summary = dict(line.split(" ", 2)[1:3] for line in report.splitlines() if line.startswith("ℹ "))
    assert int(summary.get("fail", "1")) == 0 and int(summary.get("pass", "0")) > 0, report[-4000:]
    if os.environ.get("CI") == "true":
        assert int(summary.get("skipped", "0")) == 0, f"CI=true and a Node test skipped:\n{report[-4000:]}"
