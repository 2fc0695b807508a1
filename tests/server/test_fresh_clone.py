"""A stranger's first run: clone, a fresh venv, ``pip install .`` (not editable), then the
README's first command from the clone's root.

The clone is of this checkout's HEAD with the uncommitted changes laid over it (tracked
changes and untracked files git does not ignore), so what is tested is what a commit
would hold; on CI's clean checkout that is HEAD itself. The server and connflood then
run from the root of the clone, where the unbuilt source tree ``zim/`` sits next to
them: they must use the installed package, not that tree.
"""
from __future__ import annotations

import http.client
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.servers import HOST, REPO_ROOT, free_port
from tests.support.client import TcpClient, unique

README_FIRST_COMMAND = re.compile(r"```sh\n(pip install \. && zim-server)  # then open http://localhost:8082/\n```")


def run(command: list[str], cwd: Path, timeout: float, env: dict | None = None) -> str:
    result = subprocess.run(command, cwd=str(cwd), env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{command} failed ({result.returncode}):\n{result.stdout[-3000:]}\n" \
                                   f"{result.stderr[-3000:]}"
    return result.stdout


def clean_env() -> dict[str, str]:
    """The caller's environment without anything that points Python at this checkout."""
    env = {key: value for key, value in os.environ.items()
           if key not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSAFEPATH", "VIRTUAL_ENV")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, Path]:
    """(clone root, venv bin directory) with zim installed non-editable from the clone."""
    if subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"], capture_output=True).returncode:
        pytest.fail("tests/server/test_fresh_clone.py needs the repository's git checkout")
    base = tmp_path_factory.mktemp("fresh")
    clone = base / "zim"
    run(["git", "clone", "-q", str(REPO_ROOT), str(clone)], base, 120)
    # what a commit would hold: tracked changes, then untracked files that are not ignored
    diff = subprocess.run(["git", "-C", str(REPO_ROOT), "diff", "--binary", "HEAD"], capture_output=True,
                          check=True).stdout
    if diff:
        subprocess.run(["git", "-C", str(clone), "apply", "--whitespace=nowarn"], input=diff, check=True)
    untracked = subprocess.run(["git", "-C", str(REPO_ROOT), "ls-files", "--others", "--exclude-standard", "-z"],
                               capture_output=True, check=True).stdout.split(b"\0")
    for name in filter(None, untracked):
        source, target = REPO_ROOT / name.decode(), clone / name.decode()
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(source.read_bytes())
        target.chmod(source.stat().st_mode)
    venv = base / "venv"
    run([sys.executable, "-m", "venv", str(venv)], base, 120)
    bin_dir = venv / "bin"
    # the README's first command is `pip install . && zim-server`, from the clone's root
    run([str(bin_dir / "pip"), "install", "-q", "."], clone, 600, clean_env())
    assert not list((clone / "zim").glob("_core*.so")), "the install built into the source tree"
    return clone, bin_dir


class Fetched:
    def __init__(self, response: http.client.HTTPResponse) -> None:
        self.status, self.headers, self.body = response.status, response.headers, response.read()


def http_get(port: int, path: str) -> Fetched:
    connection = http.client.HTTPConnection(HOST, port, timeout=5.0)
    try:
        connection.request("GET", path)
        return Fetched(connection.getresponse())
    finally:
        connection.close()


def test_readme_first_command_is_what_this_test_runs():
    match = README_FIRST_COMMAND.search((REPO_ROOT / "README.md").read_text())
    assert match, "README's first command changed: update tests/server/test_fresh_clone.py to run the new one"


def test_zim_server_from_the_clone_root_serves_logins_dms_and_channels(installed):
    clone, bin_dir = installed
    tcp, ws = free_port(), free_port()
    env = clean_env()
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    log = clone / "server.log"
    with open(log, "wb") as out:
        # default workers and store, as a stranger would run it; only the ports are ours
        server = subprocess.Popen(["zim-server", "--tcp", f"{HOST}:{tcp}", "--ws", f"{HOST}:{ws}"],
                                  cwd=str(clone), env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while True:
            assert server.poll() is None, f"zim-server exited ({server.returncode}):\n{log.read_text()}"
            try:
                alice = TcpClient(HOST, tcp, 5.0)
                break
            except OSError:
                assert time.monotonic() < deadline, f"zim-server does not listen:\n{log.read_text()}"
                time.sleep(0.1)
        bob = TcpClient(HOST, tcp, 5.0)
        a = alice.login(unique("alice"))
        b = bob.login(unique("bob"))
        sent = alice.ok(2, {"receiverId": b["id"], "content": "hello from a fresh clone"})
        action, push = bob.recv_push(5.0)
        assert (action, push["id"], push["content"]) == (101, sent["id"], "hello from a fresh clone")
        room = unique("room")
        alice.ok(3, {"name": room})
        bob.ok(3, {"name": room})
        alice.ok(4, {"channel": room, "content": "to the room"})
        action, push = bob.recv_push(5.0)
        assert (action, push["channel"], push["sender"]["id"]) == (102, room, a["id"])
        alice.close()
        bob.close()

        # the web chat (--demo on by default) from the installed package: its page, and the one
        # JavaScript client of the repository, shipped as a file (not a link into the clone)
        page = http_get(ws, "/")
        assert page.status == 200 and b'<script type="module" src="/demo.js">' in page.body
        assert "default-src 'none'" in page.headers["Content-Security-Policy"]
        script = http_get(ws, "/zim.js")
        assert script.status == 200 and script.headers["Content-Type"].startswith("text/javascript")
        assert script.body == (REPO_ROOT / "clients" / "js" / "zim.js").read_bytes()
        installed_js = subprocess.run([str(bin_dir / "python"), "-c", "import zim.demo, pathlib; print("
                                       "pathlib.Path(zim.demo.__file__).with_name('zim.js'))"],
                                      cwd="/", env=env, capture_output=True, text=True, check=True).stdout.strip()
        assert "site-packages" in installed_js and not Path(installed_js).is_symlink(), installed_js
        assert http_get(ws, "/nothing-here").status == 404

        # tools/connflood, the documented path, from the same root, on the installed package
        flood = subprocess.run(
            [str(bin_dir / "python"), "tools/connflood", "--host", HOST, "--port", str(tcp),
             "--connections", "200", "--processes", "2", "--login", "--hold", "1", "--json"],
            cwd=str(clone), env=env, capture_output=True, text=True, timeout=120)
        assert flood.returncode == 0, f"connflood failed ({flood.returncode}):\n{flood.stderr[-3000:]}"
        summary = json.loads(flood.stdout.strip().splitlines()[-1])
        assert summary["connected"] == 200 and summary["logged_in"] == 200, summary
        # and as the installed command
        flood = subprocess.run(
            ["zim-connflood", "--host", HOST, "--port", str(tcp), "--connections", "50", "--processes", "1",
             "--login", "--hold", "0", "--json"],
            cwd=str(clone), env=env, capture_output=True, text=True, timeout=120)
        assert flood.returncode == 0, f"zim-connflood failed ({flood.returncode}):\n{flood.stderr[-3000:]}"
        assert json.loads(flood.stdout.strip().splitlines()[-1])["logged_in"] == 50
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            code = server.wait(15)
        except subprocess.TimeoutExpired:
            server.kill()
            code = server.wait()
    text = log.read_text()
    assert code == 0, f"zim-server exited {code} after SIGTERM:\n{text[-4000:]}"
    assert "Traceback" not in text and "cannot start" not in text, text[-4000:]
