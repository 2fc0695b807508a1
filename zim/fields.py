"""The shape of a request body: each field checked, a clear ``bad_request`` when
it is not what the action takes. Shared by the IM actions (zim.im) and the
server API (zim.api)."""
from __future__ import annotations

from zim.handler import Error
from zim.names import MAX_CHANNEL_CHARS

PAGE_MAX = 100              # history and mailbox pages, and mailbox pushes at login


def bad_request(message: str) -> Error:
    return Error("bad_request", message)


def required_str(body: dict, field: str, max_chars: int | None = None) -> str:
    """``body[field]`` as a non-empty string of at most ``max_chars`` characters."""
    value = body.get(field)
    if not isinstance(value, str) or not value:
        raise bad_request(f"{field} must be a non-empty string")
    if max_chars is not None and len(value) > max_chars:
        raise bad_request(f"{field} must be at most {max_chars} characters")
    return value


def channel_name(body: dict, field: str) -> str:
    """A channel name: a non-empty string of at most MAX_CHANNEL_CHARS characters."""
    return required_str(body, field, MAX_CHANNEL_CHARS)


def optional_str(body: dict, field: str) -> str | None:
    """``body[field]`` if present (it must then be a string; null is not one)."""
    if field not in body:
        return None
    value = body[field]
    if not isinstance(value, str):
        raise bad_request(f"{field} must be a string")
    return value


def optional_bool(body: dict, field: str, default: bool) -> bool:
    if field not in body:
        return default
    value = body[field]
    if not isinstance(value, bool):
        raise bad_request(f"{field} must be true or false")
    return value


# orjson decodes integers outside int64/uint64 as floats (rounded, so -2**63 - 1
# arrives as -2.0**63): an integral float this large was an integer in the JSON
_FLOAT_INTS_FROM = float(1 << 63)


def optional_int(body: dict, field: str) -> int | None:
    """``body[field]`` if present; it must be a JSON integer (not true/false, not 1.5)."""
    if field not in body:
        return None
    value = body[field]
    if type(value) is int:
        return value
    # a valid JSON integer too big for 64 bits arrives as a float: still an integer
    if type(value) is float and value.is_integer() and abs(value) >= _FLOAT_INTS_FROM:
        return int(value)
    raise bad_request(f"{field} must be an integer")


def limit_param(body: dict, default: int) -> int:
    """``limit``: an integer >= 1, default ``default``, above PAGE_MAX treated as PAGE_MAX."""
    limit = optional_int(body, "limit")
    if limit is None:
        return default
    if limit < 1:
        raise bad_request("limit must be at least 1")
    return min(limit, PAGE_MAX)


def str_list(body: dict, field: str) -> list[str]:
    value = body.get(field)
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise bad_request(f"{field} must be a list of strings")
    return value
