"""``--ws-origins``: an allow-list of the web origins whose pages may open a WebSocket.

Real servers on 1 and 3 workers: a listed Origin (in any case, with or without its
default port) upgrades; another gets HTTP 403, a closed connection and a close
counted as ``origin``; a request without Origin (a non-browser client) upgrades
unless the list says ``require-origin``; ``*`` (the default) lets any through; a
bad value is refused with exit status 2, from the command line and from --config.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.servers import HOST, free_port
from tests.server.test_metrics import sample, start_with_metrics
from tests.support.client import RawWs, error_code, unique, ws_frame, ws_message

ALLOWED = "https://chat.example.com,http://localhost:3000,http://[::1]:8080"


@pytest.fixture(scope="module", params=["1", "3"], ids=["1-worker", "3-workers"])
def listed(request, start_module_server):
    """A server that lets pages of ALLOWED in, its metrics scraped."""
    return start_with_metrics(start_module_server, "--workers", request.param, "--ws-origins", ALLOWED)


def upgrade(srv, origin_lines: str) -> RawWs:
    ws = RawWs(HOST, srv.ws_port)
    ws.server = srv
    srv.clients.append(ws)
    ws.send(RawWs.upgrade_request("dGhlIHNhbXBsZSBub25jZQ==", "/", origin_lines))
    return ws


def assert_upgraded(ws: RawWs) -> None:
    status, headers = ws.read_http_head()
    assert status.startswith("HTTP/1.1 101"), status
    assert headers["sec-websocket-accept"] == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
    ws.send(ws_frame(2, ws_message(1, 1, {"name": unique("web")})))
    action, seq, body = ws.read_packet()
    assert (action, seq) == (1, 1) and error_code(body) is None and body["id"], body


def assert_refused(ws: RawWs) -> None:
    status, headers = ws.read_http_head()
    assert status == "HTTP/1.1 403 Forbidden", status
    assert headers["connection"].lower() == "close"
    body = ws.expect_eof()
    assert body == b"origin not allowed (--ws-origins)\n" and int(headers["content-length"]) == len(body), body
    ws.close()              # the server's close (and its count) follows the client's EOF
    ws.server.origin_refusals = getattr(ws.server, "origin_refusals", 0) + 1


@pytest.mark.parametrize("origin", [
    "https://chat.example.com", "HTTPS://Chat.Example.COM", "https://chat.example.com:443",
    "http://localhost:3000", "http://LOCALHOST:3000", "http://[::1]:8080",
])
def test_a_listed_origin_upgrades_and_logs_in(listed, origin):
    srv, _ = listed
    assert_upgraded(upgrade(srv, f"Origin: {origin}\r\n"))


def test_a_request_without_origin_upgrades(listed):
    srv, _ = listed
    assert_upgraded(upgrade(srv, ""))
    client = srv.ws_client()            # the websockets library sends no Origin
    assert client.login(unique("bot"))["id"]


@pytest.mark.parametrize("origin_lines", [
    "Origin: https://evil.example.com\r\n",
    "Origin: http://chat.example.com\r\n",                 # another scheme
    "Origin: https://chat.example.com:8443\r\n",           # another port
    "Origin: https://chat.example.com.evil.com\r\n",
    "Origin: http://localhost\r\n",
    "Origin: null\r\n",                                     # file:// pages: not listed
    "Origin: https://chat.example.com/\r\n",                # not an origin
    "Origin: \r\n",
    "Origin: https://chat.example.com\r\nOrigin: https://evil.example.com\r\n",
])
def test_another_origin_gets_403_and_is_closed(listed, origin_lines):
    srv, _ = listed
    assert_refused(upgrade(srv, origin_lines))


def test_refusals_are_counted_as_origin_closes_and_others_still_connect(listed):
    srv, scraper = listed
    for _ in range(4):
        assert_refused(upgrade(srv, "Origin: https://evil.example.com\r\n"))
    # every refusal of this module's server so far, and nothing else
    scraper.wait(lambda got: sample(got, "zim_connections_closed_total", reason="origin") == srv.origin_refusals,
                 f"{srv.origin_refusals} origin closes")
    got = scraper.samples()
    assert sample(got, "zim_connections_closed_total", reason="protocol_error") == 0
    assert_upgraded(upgrade(srv, "Origin: https://chat.example.com\r\n"))
    srv.assert_alive()


def test_frames_sent_with_a_refused_upgrade_are_not_read(listed):
    srv, _ = listed
    ws = upgrade(srv, "Origin: https://evil.example.com\r\n")
    ws.send(ws_frame(2, ws_message(1, 1, {"name": unique("sneaky")})))
    assert_refused(ws)          # the 403 and EOF, no answer to the login


@pytest.mark.parametrize("workers", ["1", "3"])
def test_require_origin_refuses_requests_without_one(start_server, workers):
    srv = start_server(flags=("--workers", workers, "--ws-origins", "https://chat.example.com,require-origin"))
    assert_refused(upgrade(srv, ""))
    with pytest.raises(Exception):      # the websockets library sends no Origin: refused
        srv.ws_client()
    assert_upgraded(upgrade(srv, "Origin: https://chat.example.com\r\n"))
    assert srv.tcp_client().login(unique("tcp"))["id"]       # TCP has no Origin to check


@pytest.mark.parametrize("workers", ["1", "3"])
def test_null_is_allowed_only_when_listed_and_star_allows_any(start_server, workers):
    nulls = start_server(flags=("--workers", workers, "--ws-origins", "null,https://chat.example.com"))
    assert_upgraded(upgrade(nulls, "Origin: null\r\n"))
    assert_refused(upgrade(nulls, "Origin: https://evil.example.com\r\n"))
    star = start_server(flags=("--workers", workers, "--ws-origins", "*"))
    default = start_server(flags=("--workers", workers))      # the default is '*': today's behaviour
    for srv in (star, default):
        for origin_lines in ("Origin: https://evil.example.com\r\n", "Origin: null\r\n", "Origin: \r\n", "",
                             "Origin: https://a.example\r\nOrigin: https://b.example\r\n"):
            assert_upgraded(upgrade(srv, origin_lines))


BAD_VALUES = [
    ("", "an empty item"),
    ("https://chat.example.com,", "an empty item"),
    ("chat.example.com", "'chat.example.com' is not an origin"),
    ("https://chat.example.com/", "without a path"),
    ("https://chat.example.com:99999", "is not an origin"),
    ("https://chät.example.com", "xn-- form"),
    ("*,https://chat.example.com", "'*' allows every origin"),
    ("require-origin", "no origin allowed"),
]


def run_server(args: list[str], tmp_path: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "zim", "--tcp", f"{HOST}:{free_port()}", "--ws", "off",
                           "--data", str(tmp_path / "data"), *args],
                          capture_output=True, text=True, timeout=30, cwd=tmp_path, env=env)


@pytest.mark.parametrize("value, says", BAD_VALUES, ids=[f"bad{i}" for i in range(len(BAD_VALUES))])
def test_a_bad_value_exits_2(tmp_path, zim_env, value, says):
    result = run_server([f"--ws-origins={value}"], tmp_path, zim_env)
    assert result.returncode == 2, result.stderr
    assert "zim-server: error: argument --ws-origins:" in result.stderr and says in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "data").exists()


def test_a_bad_value_in_the_config_file_exits_2(tmp_path, zim_env):
    (tmp_path / "zim.toml").write_text('ws-origins = "https://chat.example.com/app"\n')
    result = run_server(["--config", "zim.toml"], tmp_path, zim_env)
    assert result.returncode == 2, result.stderr
    assert "zim.toml" in result.stderr and "ws-origins" in result.stderr and "without a path" in result.stderr, \
        result.stderr
    assert not (tmp_path / "data").exists()


def test_the_config_file_sets_the_list(start_server, tmp_path):
    config = tmp_path / "zim.toml"
    config.write_text('ws-origins = "https://chat.example.com"\n')
    srv = start_server(flags=("--workers", "1", "--config", str(config)))
    assert_refused(upgrade(srv, "Origin: https://evil.example.com\r\n"))
    assert_upgraded(upgrade(srv, "Origin: https://chat.example.com\r\n"))


def test_the_framework_refuses_a_bad_list_and_normalises_a_good_one():
    from zim import App
    from zim.origins import parse_origins

    with pytest.raises(ValueError, match="ws_origins: 'ftp:/x' is not an origin"):
        App().run(ws_origins="ftp:/x", tcp=None, ws=None)
    policy = parse_origins(["HTTPS://Chat.Example.com:443", "http://a.test:80", "http://b.test:8080", "NULL"])
    assert str(policy) == "http://a.test,http://b.test:8080,https://chat.example.com,null"
    assert policy.allows(["https://chat.example.com"]) and policy.allows(["null"]) and policy.allows([])
    assert not policy.allows(["http://b.test"]) and not policy.allows(["https://chat.example.com"] * 2)
