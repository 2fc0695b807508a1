"""The web chat of ``--demo on``: static pages the reactor serves on the WebSocket port.

A plain ``GET`` (no ``Upgrade``) of one of these paths gets the file; any other path
gets 404; an upgrade goes on to the WebSocket handshake as always. The reactor
answers them in C from the complete responses built here once at start
(``pages()``, given to ``zim._core.Reactor(static_pages=...)``): no Python runs per
request, and each response closes its connection.

``zim.js`` is the JavaScript client, ``clients/js/zim.js`` of the repository: this
directory holds a symbolic link to it, which the package build copies as a file, so
an installed zim serves the same one.
"""
from __future__ import annotations

from importlib import resources

# path -> (file in this package, Content-Type)
FILES = {
    b"/": ("index.html", "text/html; charset=utf-8"),
    b"/demo.js": ("demo.js", "text/javascript; charset=utf-8"),
    b"/demo.css": ("demo.css", "text/css; charset=utf-8"),
    b"/zim.js": ("zim.js", "text/javascript; charset=utf-8"),
}
# The page's own files only; its WebSocket to the same host (and port) it came from.
CONTENT_SECURITY_POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                           "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def response(body: bytes, content_type: str) -> bytes:
    """A complete HTTP/1.1 200 answer carrying ``body``, closing the connection."""
    head = (f"HTTP/1.1 200 OK\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
            f"Cache-Control: no-cache\r\nContent-Security-Policy: {CONTENT_SECURITY_POLICY}\r\n"
            f"X-Content-Type-Options: nosniff\r\nConnection: close\r\n\r\n")
    return head.encode() + body


def pages() -> dict[bytes, bytes]:
    """{path: complete response} of the demo's files, read from the installed package."""
    here = resources.files(__name__)
    return {path: response(here.joinpath(name).read_bytes(), content_type)
            for path, (name, content_type) in FILES.items()}


def reactor_pages(demo: bool) -> dict[bytes, bytes] | None:
    """The Reactor's ``static_pages`` for ``--demo on|off``."""
    return pages() if demo else None
