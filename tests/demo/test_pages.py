"""``--demo on|off``: plain HTTP GETs on the WebSocket port answered by the reactor from
its table of pages (zim/codec/static.pxi, zim/demo), over real sockets."""
from __future__ import annotations

import socket

import pytest

from tests.support import REPO_ROOT
from tests.support.client import WsClient, unique
from tests.support.servers import HOST
from zim.demo import FILES


@pytest.fixture(scope="module")
def demo(start_module_server):
    """A server of two workers with the demo on (the default): the pages reach every worker."""
    return start_module_server(flags=("--workers", "2"))


def raw_http(port: int, request: bytes, timeout: float = 5.0) -> bytes:
    """Send ``request`` and read until the server closes the connection."""
    with socket.create_connection((HOST, port), timeout=timeout) as sock:
        sock.sendall(request)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def get(port: int, path: str, headers: str = "") -> tuple[str, dict[str, str], bytes]:
    answer = raw_http(port, f"GET {path} HTTP/1.1\r\nHost: localhost\r\n{headers}\r\n".encode())
    head, _, body = answer.partition(b"\r\n\r\n")
    status, *lines = head.decode("latin-1").split("\r\n")
    fields = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}
    return status, fields, body


@pytest.mark.parametrize("path", [path.decode() for path in FILES])
def test_each_page_is_served_whole_with_its_headers_then_closed(demo, path):
    status, headers, body = get(demo.ws_port, path)
    assert status == "HTTP/1.1 200 OK"
    assert int(headers["content-length"]) == len(body) > 0
    assert headers["connection"] == "close" and headers["cache-control"] == "no-cache"
    assert headers["content-type"].startswith(("text/html", "text/javascript", "text/css"))
    assert "default-src 'none'" in headers["content-security-policy"]
    assert body == (REPO_ROOT / "zim" / "demo" / FILES[path.encode()][0]).read_bytes()


def test_the_page_loads_the_one_javascript_client(demo):
    assert b'<script type="module" src="/demo.js">' in get(demo.ws_port, "/")[2]
    assert b'from "/zim.js"' in get(demo.ws_port, "/demo.js")[2]
    assert get(demo.ws_port, "/zim.js")[2] == (REPO_ROOT / "clients" / "js" / "zim.js").read_bytes()


def test_a_query_string_is_ignored_and_other_paths_are_404(demo):
    assert get(demo.ws_port, "/?from=home")[2] == get(demo.ws_port, "/")[2]
    for path in ("/index.html", "/zim.js/", "/ZIM.JS", "/../zim.js", "/favicon.ico"):
        status, headers, body = get(demo.ws_port, path)
        assert (status, headers["connection"], body) == ("HTTP/1.1 404 Not Found", "close", b"not found\n"), path


def test_one_answer_per_connection_even_when_requests_are_pipelined(demo):
    one = f"GET /demo.css HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    answer = raw_http(demo.ws_port, one * 3)
    assert answer.count(b"HTTP/1.1 200 OK") == 1


def test_upgrades_and_other_requests_still_go_to_the_websocket_handshake(demo):
    ws = WsClient(HOST, demo.ws_port, path="/")          # an upgrade of "/" is a WebSocket
    try:
        assert ws.login(unique("u"))["id"].isdigit()
    finally:
        ws.close()
    # an Upgrade header (any case) without a valid handshake: 400, as before
    assert raw_http(demo.ws_port, b"GET / HTTP/1.1\r\nHost: x\r\nUPGRADE: websocket\r\n\r\n").startswith(
        b"HTTP/1.1 400 ")
    assert raw_http(demo.ws_port, b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n").startswith(
        b"HTTP/1.1 400 ")
    assert raw_http(demo.ws_port, b"GET /zim.js HTTP/1.0\r\n\r\n").startswith(b"HTTP/1.1 200 OK")


def test_demo_off_answers_plain_gets_as_before(start_server):
    srv = start_server(flags=("--demo", "off", "--workers", "1"))
    for path in ("/", "/zim.js", "/nothing"):
        assert raw_http(srv.ws_port, f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode()).startswith(
            b"HTTP/1.1 400 Bad Request"), path
