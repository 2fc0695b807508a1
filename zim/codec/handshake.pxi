# The WebSocket upgrade (RFC 6455 section 4): finding the end of the request
# head, checking it, the --ws-origins check (403) and the 101 answer, with the
# extension offer parsed for permessage-deflate (negotiate_deflate, deflate.pxi).
# Runs once per connection, so it is plain Python. Included by zim/_codec.pyx.
import base64
import hashlib
import re


cdef Py_ssize_t find_header_end(const char* buf, size_t length) noexcept nogil:
    """Offset just past the blank line ending an HTTP request head, or -1."""
    cdef size_t i
    if length < 4:
        return -1
    for i in range(length - 3):
        if buf[i] == b'\r' and buf[i + 1] == b'\n' and buf[i + 2] == b'\r' and buf[i + 3] == b'\n':
            return i + 4
    return -1


_WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_ORIGIN_REFUSED = b"origin not allowed (--ws-origins)\n"
_HTTP_403_ORIGIN = (b"HTTP/1.1 403 Forbidden\r\nConnection: close\r\nContent-Type: text/plain\r\n"
                    b"Content-Length: " + str(len(_ORIGIN_REFUSED)).encode() + b"\r\n\r\n" + _ORIGIN_REFUSED)
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_QUOTED = re.compile(r'"((?:[^"\\]|\\.)*)"')


def _parse_extensions(str value):
    """A Sec-WebSocket-Extensions value as [(name, [(param, value or None)])]
    (RFC 6455 9.1), or None if it does not follow the grammar."""
    cdef list offers = [], params = None
    cdef Py_ssize_t pos = 0, end = len(value)
    cdef str param
    expect_name = True
    while True:
        while pos < end and value[pos] in " \t":
            pos += 1
        if pos == end:
            return offers if expect_name else None    # a trailing ';' has no parameter
        if expect_name and value[pos] == ",":       # empty list elements are allowed
            pos += 1
            continue
        token = _TOKEN.match(value, pos)
        if token is None:
            return None
        pos = token.end()
        if expect_name:
            params = []
            offers.append((token.group(), params))
        else:
            param = token.group()
            while pos < end and value[pos] in " \t":
                pos += 1
            if pos < end and value[pos] == "=":
                pos += 1
                while pos < end and value[pos] in " \t":
                    pos += 1
                quoted = _QUOTED.match(value, pos)
                if quoted is not None:
                    unquoted = re.sub(r"\\(.)", r"\1", quoted.group(1))
                    if _TOKEN.fullmatch(unquoted) is None:      # RFC 6455 9.1: a token once unquoted
                        return None
                    params.append((param, unquoted))
                    pos = quoted.end()
                else:
                    token = _TOKEN.match(value, pos)
                    if token is None:
                        return None
                    params.append((param, token.group()))
                    pos = token.end()
            else:
                params.append((param, None))
        while pos < end and value[pos] in " \t":
            pos += 1
        if pos == end:
            return offers
        if value[pos] == ";":
            expect_name = False
        elif value[pos] == ",":
            expect_name = True
        else:
            return None
        pos += 1


cdef object ws_handshake(bytes request, bint deflate, object origins=None):
    """(the 101 answer, server window bits or 0) for a valid RFC 6455 upgrade
    request head, else None. ``deflate``: accept a permessage-deflate offer.
    ``origins``: None (any Origin), or a zim.origins.OriginPolicy whose
    ``allows(values)`` decides on the request's Origin header values; a valid
    request it refuses gets (the 403 answer, -1).

    Runs once per WebSocket connection, so plain Python parsing is fine here.
    """
    cdef list lines
    cdef list extensions = []
    cdef list origin_values = []
    try:
        lines = request.decode("latin-1").split("\r\n")
    except Exception:
        return None
    parts = lines[0].split(" ")
    if len(parts) != 3 or parts[0] != "GET" or not parts[2].startswith("HTTP/1.1"):
        return None
    headers = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep:
            return None
        name = name.strip().lower()
        headers[name] = value.strip()
        if name == "sec-websocket-extensions":     # may come in several lines
            extensions.append(value.strip())
        elif name == "origin":
            origin_values.append(value.strip())
    if headers.get("upgrade", "").lower() != "websocket":
        return None
    if "upgrade" not in {t.strip().lower() for t in headers.get("connection", "").split(",")}:
        return None
    if headers.get("sec-websocket-version") != "13":
        return None
    key = headers.get("sec-websocket-key", "")
    try:
        if len(base64.b64decode(key, validate=True)) != 16:
            return None
    except Exception:
        return None
    if origins is not None and not origins.allows(origin_values):
        return _HTTP_403_ORIGIN, -1
    accept = base64.b64encode(hashlib.sha1(key.encode() + _WS_GUID).digest())
    response = (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n")
    agreed, bits = negotiate_deflate(", ".join(extensions)) if deflate and extensions else (None, 0)
    if agreed is not None:
        response += b"Sec-WebSocket-Extensions: " + agreed.encode() + b"\r\n"
    return response + b"\r\n", bits
