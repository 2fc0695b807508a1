"""``--ws-origins``: which web pages may open a WebSocket to the server.

A browser sends the page's origin (``Origin: https://chat.example.com``) with
every WebSocket upgrade and lets any page connect anywhere: the server is the
one that must refuse pages it does not serve. Clients that are not browsers
usually send no Origin, and can send any they like, so the check protects
against other sites' pages only (docs/protocol.md, "Origin").

The setting is a comma-separated list:

- ``*`` (the default): any origin, and requests without one;
- ``scheme://host[:port]``: that origin, compared as browsers serialise it:
  scheme and host case-insensitively, the default port (80 for http and ws, 443
  for https and wss) the same as none, no path, no user, no query;
- ``null``: the opaque origin ``null`` (file:// pages, sandboxed frames);
- ``require-origin``: refuse upgrades that carry no Origin header (by default
  they are allowed: non-browser clients send none).

A request with several Origin headers, or one that is not an origin, matches
only ``*``.
"""
from __future__ import annotations

import re
from typing import Iterable, Union

ANY = "*"
NULL = "null"
REQUIRE = "require-origin"
DEFAULT = ANY

_DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}
_SCHEME = r"[a-z][a-z0-9+.-]*"
_LABEL = r"[a-z0-9_](?:[a-z0-9_-]*[a-z0-9_])?"
_HOST = rf"(?:{_LABEL}(?:\.{_LABEL})*\.?|\[[0-9a-f:.]+\])"
_ORIGIN = re.compile(rf"({_SCHEME})://({_HOST})(?::([0-9]{{1,5}}))?", re.IGNORECASE | re.ASCII)


def normalize_origin(text: str) -> Union[str, None]:
    """``text`` as ``scheme://host[:port]``, lower case, the scheme's default port
    left out; None if it is not an origin of that form."""
    match = _ORIGIN.fullmatch(text.strip())
    if match is None:
        return None
    scheme, host, port = match[1].lower(), match[2].lower(), match[3]
    if port is None:
        return f"{scheme}://{host}"
    number = int(port)
    if not 1 <= number <= 65535:
        return None
    if _DEFAULT_PORTS.get(scheme) == number:
        return f"{scheme}://{host}"
    return f"{scheme}://{host}:{number}"


class OriginPolicy:
    """A parsed ``--ws-origins``. ``allows(values)`` decides on the Origin header
    values of one upgrade request (an empty list: no Origin header)."""

    __slots__ = ("any", "origins", "null", "require")

    def __init__(self, any_origin: bool, origins: frozenset, allow_null: bool, require: bool) -> None:
        self.any = any_origin
        self.origins = origins
        self.null = allow_null
        self.require = require

    def allows(self, values: list) -> bool:
        if not values:
            return not self.require
        if self.any:
            return True
        if len(values) != 1:
            return False
        value = values[0].strip()
        if value.lower() == NULL:
            return self.null
        origin = normalize_origin(value)
        return origin is not None and origin in self.origins

    def __str__(self) -> str:
        items = ([ANY] if self.any else []) + sorted(self.origins) + ([NULL] if self.null else []) \
            + ([REQUIRE] if self.require else [])
        return ",".join(items)

    def __repr__(self) -> str:
        return f"OriginPolicy({str(self)!r})"


def parse_origins(setting: Union[str, Iterable[str]]) -> OriginPolicy:
    """The policy of a ``--ws-origins`` value (a comma-separated string, or its
    items); ValueError with a message naming the bad item."""
    if isinstance(setting, str):
        items = setting.split(",")
    else:
        items = list(setting)
        if not all(isinstance(item, str) for item in items):
            raise ValueError(f"ws_origins must be a string or strings, not {setting!r}")
    any_origin = allow_null = require = False
    origins = set()
    for raw in items:
        item = raw.strip()
        lowered = item.lower()
        if not item:
            raise ValueError("an empty item (give '*', origins like https://chat.example.com, "
                             "'null' or 'require-origin', separated by commas)")
        if item == ANY:
            any_origin = True
        elif lowered == NULL:
            allow_null = True
        elif lowered == REQUIRE:
            require = True
        else:
            origin = normalize_origin(item)
            if origin is None:
                raise ValueError(f"{item!r} is not an origin: write scheme://host[:port], "
                                 "without a path (e.g. https://chat.example.com or http://localhost:3000; "
                                 "an international domain name in its xn-- form)")
            origins.add(origin)
    if any_origin and (origins or allow_null):
        raise ValueError("'*' allows every origin: give it alone (or with 'require-origin'), "
                         "not with a list")
    if not any_origin and not origins and not allow_null:
        raise ValueError("no origin allowed: give '*' or at least one origin")
    return OriginPolicy(any_origin, frozenset(origins), allow_null, require)


def origin_check(setting: Union[str, Iterable[str]]) -> Union[OriginPolicy, None]:
    """What the reactor checks upgrades with: None when the setting lets every
    request through (``*``), so nothing is looked at; else the policy."""
    policy = parse_origins(setting)
    return None if policy.any and not policy.require else policy
