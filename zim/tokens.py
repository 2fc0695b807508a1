"""Login tokens: ``"<user id>.<signature>"``, signed with a per-server secret.

Tokens are not stored anywhere: the HMAC over the user id is the proof that this
server issued the token. Anyone with the secret file can mint tokens for every
user, so it is created readable by its owner only.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import os

SECRET_FILE = "secret"
SECRET_BYTES = 32
SIGNATURE_BYTES = 16        # HMAC-SHA256 truncated: 128 bits is plenty against forgery
MAX_USER_ID = (1 << 64) - 1
_DOMAIN = b"zim-login-token-v1:"   # so this HMAC cannot be confused with other uses of the key


def load_or_create_secret(data_dir: str) -> bytes:
    """The 32-byte token secret in ``DATA/secret``, created (mode 0600) on first use.

    Raises RuntimeError if the file exists but cannot be read or is not exactly 32
    bytes: making a new secret silently would log every user out.
    """
    path = os.path.join(data_dir, SECRET_FILE)
    if not os.path.lexists(path):
        try:
            _create_secret(data_dir, path)
        except OSError as exc:
            raise RuntimeError(f"cannot create the token secret {path}: {exc}") from exc
    try:
        with open(path, "rb") as file:
            secret = file.read(SECRET_BYTES + 1)
    except OSError as exc:
        raise RuntimeError(f"cannot read the token secret {path}: {exc}") from exc
    if len(secret) != SECRET_BYTES:
        raise RuntimeError(
            f"the token secret {path} is {len(secret)} bytes, expected {SECRET_BYTES}; "
            "restore it from a backup, or delete it to log every user out"
        )
    return secret


def _create_secret(data_dir: str, path: str) -> None:
    """Write a new secret to a temporary file, then move it into place atomically,
    so a crash never leaves a partial secret behind."""
    temp = os.path.join(data_dir, f".{SECRET_FILE}.{os.getpid()}.tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)   # O_CREAT's mode is narrowed by umask only; be exact
        if os.write(fd, os.urandom(SECRET_BYTES)) != SECRET_BYTES:
            raise OSError(f"short write to {temp}")
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        try:
            # link() refuses to replace a secret another process created meanwhile
            os.link(temp, path)
        except FileExistsError:
            pass
        except OSError:
            os.replace(temp, path)   # a file system without hard links
    finally:
        if os.path.lexists(temp):
            os.unlink(temp)
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


def _signature(secret: bytes, user_id: int) -> bytes:
    mac = hmac.new(secret, _DOMAIN + str(user_id).encode("ascii"), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(mac[:SIGNATURE_BYTES]).rstrip(b"=")


def make_token(secret: bytes, user_id: int) -> str:
    """The token for ``user_id``: ``"<decimal id>.<22 url-safe base64 characters>"``."""
    if not 0 < user_id <= MAX_USER_ID:
        raise ValueError("user_id must be in 1..2**64-1")
    return f"{user_id}.{_signature(secret, user_id).decode('ascii')}"


def verify_token(secret: bytes, token: str) -> int | None:
    """The user id a token was made for, or None for anything this server did not issue.

    Never raises: malformed input (wrong type, non-ASCII, bad id) is just None.
    """
    try:
        if not isinstance(token, str) or len(token) > 64:
            return None
        id_text, dot, signature = token.partition(".")
        user_id = parse_user_id(id_text)
        if not dot or user_id is None:
            return None
        given = signature.encode("utf-8", "surrogatepass")
        if hmac.compare_digest(given, _signature(secret, user_id)):
            return user_id
        return None
    except Exception:  # noqa: BLE001 -- a token is client input: reject, never crash
        return None


def parse_user_id(text: object) -> int | None:
    """A canonical decimal user id (ASCII digits, no sign, no leading zero, 1..2**64-1),
    or None."""
    if not isinstance(text, str) or not 0 < len(text) <= 20 or not text.isascii() or not text.isdigit():
        return None
    if text[0] == "0":
        return None
    value = int(text)
    return value if value <= MAX_USER_ID else None
