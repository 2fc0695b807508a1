"""What the server API tests share: a key file, the server's flags, and an HTTP
client that checks every answer against docs/api.openapi.json (its status is
one the operation documents, its body validates against that response's
schema) and records which operations succeeded."""
from __future__ import annotations

import http.client
import json
import re
import socket
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012
from tests.support import REPO_ROOT
from tests.support.client import unique
from tests.support.servers import free_port

SPEC_PATH = REPO_ROOT / "docs" / "api.openapi.json"
SPEC = json.loads(SPEC_PATH.read_text())
SPEC_URI = "urn:zim:api.openapi.json"
REGISTRY = Registry().with_resource(SPEC_URI, Resource.from_contents(SPEC, default_specification=DRAFT202012))
METHODS = ("get", "put", "post", "delete", "patch", "options", "head")
KEY = "k" * 8 + "-test-key-0123456789"


def operations() -> list[tuple[str, str]]:
    """Every (METHOD, path template) the file documents."""
    return [(method.upper(), path) for path, item in SPEC["paths"].items() for method in item if method in METHODS]


def _template_regex(template: str) -> re.Pattern:
    return re.compile("^" + re.sub(r"\\\{[^}]+\\\}", "[^/]+", re.escape(template)) + "$")


TEMPLATES = [(template, _template_regex(template)) for template in SPEC["paths"]]


def template_of(path: str) -> str | None:
    path = path.split("?", 1)[0]
    for template, regex in TEMPLATES:
        if regex.match(path):
            return template
    return None


def _pointer(*parts: str) -> str:
    return "".join("/" + part.replace("~", "~0").replace("/", "~1") for part in parts)


def _resolve(node: dict) -> tuple[dict, str]:
    """A response object, following a ``$ref`` to components; and its JSON pointer."""
    ref = node.get("$ref")
    if ref is None:
        return node, ""
    parts = ref[2:].split("/")
    target = SPEC
    for part in parts:
        target = target[part.replace("~1", "/").replace("~0", "~")]
    return target, ref[1:]


def check_answer(method: str, path: str, status: int, body: Any) -> str | None:
    """Assert the answer is one the file documents; the operation's template, if any."""
    template = template_of(path)
    if template is None or method.lower() not in SPEC["paths"][template]:
        schema_pointer = "/components/schemas/Error"    # an unknown path or method: an Error
        assert status in (404, 405), (method, path, status, body)
    else:
        responses = SPEC["paths"][template][method.lower()]["responses"]
        assert str(status) in responses, f"{method} {template} answered {status}, not documented: {body}"
        response, pointer = _resolve(responses[str(status)])
        pointer = pointer or _pointer("paths", template, method.lower(), "responses", str(status))
        assert "content" in response, (method, template, status)
        schema_pointer = f"{pointer}/content/application~1json/schema"
    validator = Draft202012Validator({"$ref": f"{SPEC_URI}#{schema_pointer}"}, registry=REGISTRY)
    errors = sorted(validator.iter_errors(body), key=str)
    assert not errors, f"{method} {path} {status}: {body} does not match the file: {errors[0].message}"
    return template


class ApiClient:
    """Requests to a server's API over one keep-alive connection (made again when
    the server closes it); ``succeeded`` collects the (METHOD, template) of 2xx answers."""

    def __init__(self, port: int, key: str | None = KEY, succeeded: set | None = None) -> None:
        self.port = port
        self.key = key
        self.succeeded = succeeded if succeeded is not None else set()
        self.conn: http.client.HTTPConnection | None = None

    def request(self, method: str, path: str, body: Any = None, *, raw: bytes | None = None,
                key: str | None = "default", headers: dict | None = None) -> tuple[int, Any, dict]:
        """(status, JSON body, headers), checked against the file."""
        key = self.key if key == "default" else key
        fields = dict(headers or {})
        if key is not None:
            fields["Authorization"] = f"Bearer {key}"
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        if data is not None:
            fields["Content-Type"] = "application/json"
        for attempt in range(2):
            if self.conn is None:
                self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
            try:
                self.conn.request(method, path, body=data, headers=fields)
                response = self.conn.getresponse()
                text = response.read()
                break
            except (ConnectionError, http.client.RemoteDisconnected, BrokenPipeError):
                self.close()
                if attempt:
                    raise
        if response.getheader("Connection", "").lower() == "close":
            self.close()
        answer = json.loads(text) if method != "HEAD" else None
        if method != "HEAD":
            template = check_answer(method, path, response.status, answer)
            if 200 <= response.status < 300 and template is not None:
                self.succeeded.add((method, template))
        return response.status, answer, dict(response.getheaders())

    def ok(self, method: str, path: str, body: Any = None, status: int = 200) -> dict:
        got, answer, _ = self.request(method, path, body)
        assert got == status, f"{method} {path}: {got} {answer}"
        return answer

    def error(self, method: str, path: str, body: Any = None, **kwargs: Any) -> tuple[int, str]:
        """(status, error code) of a request that must fail."""
        got, answer, _ = self.request(method, path, body, **kwargs)
        assert got >= 400, f"{method} {path} succeeded: {answer}"
        return got, answer["error"]["code"]

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def logged_in(srv, name: str | None = None, count: int = 2) -> list:
    """``count`` logged-in TCP connections of one new user of server ``srv``."""
    first = srv.tcp_client()
    first.login(name or unique("u"))
    rest = [srv.tcp_client() for _ in range(count - 1)]
    for client in rest:
        client.login(first.name, token=first.token)
    return [first, *rest]


def channel_path(channel: str, *rest: str) -> str:
    return "/api/v1/channels/" + "/".join([quote(channel, safe=""), *rest])


def user_path(user_id: str, *rest: str) -> str:
    return "/api/v1/users/" + "/".join([user_id, *rest])


def write_key_file(directory: Path, key: str = KEY) -> Path:
    path = directory / "api-key"
    path.write_text(key + "\n")
    path.chmod(0o600)
    return path


def api_flags(directory: Path) -> tuple[list[str], int]:
    """The flags of a server serving the API on a free port, and that port."""
    port = free_port()
    return ["--api", f"127.0.0.1:{port}", "--api-key-file", str(write_key_file(directory))], port


def raw_exchange(port: int, data: bytes, timeout: float = 5.0) -> bytes:
    """Send ``data``, read until the server closes (or ``timeout``)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        chunks = []
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except socket.timeout:
            pass
        return b"".join(chunks)


def wait_for_port(port: int, timeout: float = 15.0) -> None:
    """The API's port accepts (it opens a moment after the IM ports)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
