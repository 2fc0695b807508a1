"""Identity from the application (JWT logins) and who may join a private channel.

``JwtLogins`` is the JWT side of action 1 in the process that runs the handlers
(the single process, or the router of ``--workers N``; each node of a Redis
service has its own): the keys (``zim.jwtauth.JwtKeys``, read again when their
file changes), the count of refused tokens by reason (metrics), and, per user,
the private channels the ``channels`` claim of the user's latest JWT login
grants. Those are kept while the user has a connection on this server and
dropped with its last one (``forget``, from ``Server.user_gone``): nothing per
connection, nothing stored.

A JWT's ``sub`` is the zim user id (docs/protocol.md): a canonical decimal
integer 1..2**63-1 (``subject_user_id``); an application whose ids are strings
keeps a number per user.
"""
from __future__ import annotations

import logging
import os
import re

from zim.datadir import UnsafeFile
from zim.handler import Error
from zim.jwtauth import JwtClaims, JwtKeyError, JwtKeys, JwtRefused

log = logging.getLogger("zim")

MAX_SUBJECT_ID = (1 << 63) - 1
BAD_SUB = "bad sub"
BAD_SUB_MESSAGE = "sub must be a decimal user id, 1 to 9223372036854775807 without leading zeros"
_DECIMAL = re.compile(r"[1-9][0-9]{0,18}")      # ASCII digits only (str.isdigit takes others)


def subject_user_id(subject: str) -> int | None:
    """The user id a JWT's ``sub`` names, or None if it is not a canonical
    decimal integer in 1..2**63-1."""
    if not _DECIMAL.fullmatch(subject):
        return None
    user_id = int(subject)
    return user_id if user_id <= MAX_SUBJECT_ID else None


class JwtLogins:
    """See the module docstring. ``keys``' file is watched by ``reload_if_changed``
    (once a second): a changed file is read again; one that cannot be used is
    logged and the keys in use stay."""

    def __init__(self, keys: JwtKeys) -> None:
        self.keys = keys
        self.path = keys.jwks_file or keys.key_file or ""
        self._file_state = _file_state(self.path)
        self.refusals: dict[str, int] = {}              # reason -> tokens refused (fixed texts: bounded)
        self._channels: dict[int, frozenset[str]] = {}  # user id -> channels its latest JWT login grants

    def verify(self, token: str) -> tuple[int, JwtClaims]:
        """The user id and claims of a genuine token, else ``zim.handler.Error``
        ``unauthorized`` saying why (counted by reason)."""
        try:
            claims = self.keys.verify(token)
            user_id = subject_user_id(claims.subject)
            if user_id is None:
                raise JwtRefused(BAD_SUB)
        except JwtRefused as refused:
            self.refusals[refused.reason] = self.refusals.get(refused.reason, 0) + 1
            message = BAD_SUB_MESSAGE if refused.reason == BAD_SUB else f"JWT refused: {refused.reason}"
            raise Error(refused.code, message) from None
        return user_id, claims

    # -- the channels claim, per user ------------------------------------------------
    def remember(self, user_id: int, channels: tuple[str, ...]) -> None:
        """The user logged in with a JWT granting ``channels`` (replacing any earlier grant)."""
        if channels:
            self._channels[user_id] = frozenset(channels)
        else:
            self._channels.pop(user_id, None)

    def forget(self, user_id: int) -> None:
        """The user has no connection left here: its claim's grants go."""
        self._channels.pop(user_id, None)

    def grants(self, user_id: int, channel: str) -> bool:
        """Whether the user's latest JWT login grants ``channel``."""
        channels = self._channels.get(user_id)
        return channels is not None and channel in channels

    # -- key rotation -------------------------------------------------------------------
    def reload_if_changed(self) -> None:
        state = _file_state(self.path)
        if state == self._file_state:
            return
        self._file_state = state
        try:
            self.keys.reload()
        except (JwtKeyError, UnsafeFile, OSError) as exc:
            log.error("JWT keys not reloaded, the keys in use stay: %s", exc)
            return
        log.info("JWT keys reloaded from %s%s", self.path,
                 f": key ids {', '.join(self.keys.key_ids)}" if self.keys.key_ids else "")


def _file_state(path: str) -> tuple[int, int, int, int] | None:
    """What changes when a file is rewritten or replaced (None: unreadable)."""
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns
