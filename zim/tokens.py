"""Login tokens, signed with a per-server secret.

A token (version 2) is ``"v2.<user id>.<epoch>.<expires>.<signature>"``:

- ``expires``: when it stops being valid, Unix milliseconds (issue time +
  ``--token-ttl``);
- ``epoch``: the user's token generation when it was issued. "Log out
  everywhere" bumps the user's epoch in the store, and from then on only
  tokens of the new epoch are valid: every older one is revoked at once,
  without touching anyone else's;
- ``signature``: HMAC-SHA256 over all of the above, truncated to 128 bits,
  url-safe base64.

Tokens are not stored anywhere: the HMAC is the proof that this server issued
the token, the store keeps one small number per user (the epoch, 0 until the
first revocation). Comparisons of signatures are constant-time
(``hmac.compare_digest``).

Version 1 tokens (``"<user id>.<signature>"``, no expiry, no epoch) were issued
by zim before tokens expired. ``verify_token`` still reads them (as epoch 0,
expiring never); the login decides whether one is still accepted: only until a
deadline (the upgrade's time + ``--token-ttl``, ``zim.im``), and never once
the user's epoch has been bumped.

Anyone with the secret can mint tokens for every user: see
``load_or_create_secret`` and ``zim.datadir`` for how it is kept private.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import os
from typing import NamedTuple

from zim.datadir import UnsafeFile, create_private_file, read_private_file

SECRET_FILE = "secret"
SECRET_BYTES = 32
SIGNATURE_BYTES = 16        # HMAC-SHA256 truncated: 128 bits is plenty against forgery
MAX_USER_ID = (1 << 64) - 1
MAX_EPOCH = (1 << 32) - 1
MAX_EXPIRES_MS = (1 << 53) - 1      # a JSON-safe integer: year 287,000 and more
MAX_TOKEN_CHARS = 128
VERSION = "v2"
_DOMAIN = b"zim-login-token-v2:"   # so this HMAC cannot be confused with other uses of the key
_DOMAIN_V1 = b"zim-login-token-v1:"
_SECRET_ID_DOMAIN = b"zim-secret-id:"


class Claims(NamedTuple):
    """What a genuine token says: whose it is, its epoch, and when it expires
    (Unix ms; 0 for a version 1 token, which carried no expiry)."""

    user_id: int
    epoch: int
    expires: int
    version: int

    def valid_at(self, now_ms: int) -> bool:
        """Not expired at ``now_ms`` (a version 1 token: see ``zim.im``)."""
        return self.version == 1 or now_ms < self.expires


# ------------------------------------------------------------------ the secret


def load_or_create_secret(data_dir: str) -> bytes:
    """The 32-byte token secret in ``DATA/secret``, created (mode 0600) on first use.

    Raises RuntimeError (``zim.datadir.UnsafeFile`` for the unsafe cases) if the
    file exists but is a symlink, is not ours, is open to group or others, cannot
    be read or is not exactly 32 bytes: making a new secret silently would log
    every user out, and using a loose one would let others log in as anyone.
    """
    path = os.path.join(data_dir, SECRET_FILE)
    if not os.path.lexists(path):
        try:
            _create_secret(data_dir, path)
        except UnsafeFile:
            raise
        except OSError as exc:
            raise RuntimeError(f"cannot create the token secret {path}: {exc}") from exc
    return read_secret_file(path, "token secret")


def read_secret_file(path: str, what: str = "token secret") -> bytes:
    """Read a 32-byte secret from ``path``, never through a symlink, refusing a
    file that is not ours or is open to group or others (``read_private_file``)."""
    secret = read_private_file(path, what, SECRET_BYTES + 1)
    if len(secret) != SECRET_BYTES:
        raise RuntimeError(
            f"the {what} {path} is {len(secret)} bytes, expected {SECRET_BYTES}; "
            "restore it from a backup, or delete it to log every user out"
        )
    return secret


def _create_secret(data_dir: str, path: str) -> None:
    """Write a new secret to a temporary file, then move it into place atomically,
    so a crash never leaves a partial secret behind. The temporary file is made
    with O_CREAT|O_EXCL|O_NOFOLLOW: whatever is in its way (a symlink planted
    there, a file) is refused, never followed or overwritten."""
    temp = os.path.join(data_dir, f".{SECRET_FILE}.{os.getpid()}.tmp")
    try:
        fd = create_private_file(temp)
    except FileExistsError as exc:
        raise UnsafeFile(f"cannot create the token secret: {temp} is in the way (a leftover, or a "
                         f"file or symlink someone planted). Check what it is, remove it, and start "
                         f"again") from exc
    created = True
    try:
        try:
            if os.write(fd, os.urandom(SECRET_BYTES)) != SECRET_BYTES:
                raise OSError(f"short write to {temp}")
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            # link() refuses to replace a secret another process created meanwhile
            os.link(temp, path, follow_symlinks=False)
        except FileExistsError:
            pass
        except OSError:
            os.replace(temp, path)   # a file system without hard links
            created = False
    finally:
        if created:
            try:
                os.unlink(temp)     # ours (O_EXCL made it): unlink removes the entry, never a target
            except FileNotFoundError:
                pass
    try:
        dir_fd = os.open(data_dir, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)  # the new directory entry survives a power cut too
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def secret_id(secret: bytes) -> str:
    """A fingerprint of a secret that says nothing about it (an HMAC of a fixed
    text): nodes compare theirs in Redis, so one started with another secret
    file is refused instead of issuing tokens the others reject."""
    return hmac.new(secret, _SECRET_ID_DOMAIN, hashlib.sha256).hexdigest()[:32]


# ------------------------------------------------------------------ tokens


def _sign(secret: bytes, domain: bytes, text: str) -> bytes:
    mac = hmac.new(secret, domain + text.encode("ascii"), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(mac[:SIGNATURE_BYTES]).rstrip(b"=")


def make_token(secret: bytes, user_id: int, epoch: int, expires_ms: int) -> str:
    """A version 2 token for ``user_id`` of token generation ``epoch``, valid until
    ``expires_ms`` (Unix ms)."""
    if not 0 < user_id <= MAX_USER_ID:
        raise ValueError("user_id must be in 1..2**64-1")
    if not 0 <= epoch <= MAX_EPOCH:
        raise ValueError(f"epoch must be in 0..{MAX_EPOCH}")
    if not 0 < expires_ms <= MAX_EXPIRES_MS:
        raise ValueError("expires_ms must be a positive Unix time in ms")
    claims = f"{VERSION}.{user_id}.{epoch}.{expires_ms}"
    return f"{claims}.{_sign(secret, _DOMAIN, claims).decode('ascii')}"


def make_v1_token(secret: bytes, user_id: int) -> str:
    """A token as zim made them before version 2 (``"<id>.<signature>"``); for
    tests and tools only: a server issues only version 2."""
    if not 0 < user_id <= MAX_USER_ID:
        raise ValueError("user_id must be in 1..2**64-1")
    return f"{user_id}.{_sign(secret, _DOMAIN_V1, str(user_id)).decode('ascii')}"


def verify_token(secret: bytes, token: object) -> Claims | None:
    """What a token issued with ``secret`` says, or None for anything else
    (forged, tampered with, malformed). It does not look at the clock or the
    store: the caller checks ``expires`` and ``epoch`` (``Claims.valid_at``).

    Never raises: malformed input (wrong type, non-ASCII, bad numbers) is just None.
    """
    try:
        if not isinstance(token, str) or len(token) > MAX_TOKEN_CHARS:
            return None
        parts = token.split(".")
        if len(parts) == 5 and parts[0] == VERSION:
            _, id_text, epoch_text, expires_text, signature = parts
            user_id = parse_user_id(id_text)
            epoch = _parse_number(epoch_text, MAX_EPOCH, zero=True)
            expires = _parse_number(expires_text, MAX_EXPIRES_MS, zero=False)
            if user_id is None or epoch is None or expires is None:
                return None
            expected = _sign(secret, _DOMAIN, token[:len(token) - len(signature) - 1])
            if hmac.compare_digest(signature.encode("utf-8", "surrogatepass"), expected):
                return Claims(user_id, epoch, expires, 2)
            return None
        if len(parts) == 2:
            user_id = parse_user_id(parts[0])
            if user_id is None:
                return None
            expected = _sign(secret, _DOMAIN_V1, parts[0])
            if hmac.compare_digest(parts[1].encode("utf-8", "surrogatepass"), expected):
                return Claims(user_id, 0, 0, 1)
        return None
    except Exception:  # noqa: BLE001 -- a token is client input: reject, never crash
        return None


def _parse_number(text: str, high: int, zero: bool) -> int | None:
    """A canonical decimal (ASCII digits, no sign, no leading zero) in 0 (or 1)..high."""
    if not 0 < len(text) <= 20 or not text.isascii() or not text.isdigit():
        return None
    if text[0] == "0" and (len(text) > 1 or not zero):
        return None
    value = int(text)
    return value if value <= high else None


def parse_user_id(text: object) -> int | None:
    """A canonical decimal user id (ASCII digits, no sign, no leading zero, 1..2**64-1),
    or None."""
    if not isinstance(text, str) or not 0 < len(text) <= 20 or not text.isascii() or not text.isdigit():
        return None
    if text[0] == "0":
        return None
    value = int(text)
    return value if value <= MAX_USER_ID else None
