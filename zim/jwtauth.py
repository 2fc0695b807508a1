"""Verifying JSON Web Tokens issued by an application's backend (issue 16, item 1).

An application that runs zim for its own users logs them in with a JWT its
backend signs; zim only verifies. ``JwtKeys`` holds the keys it trusts, from
one of:

- a key file (``key_file``), whose content decides what it is: a PEM public key
  (``-----BEGIN PUBLIC KEY-----``, RSA of 2048 bits or more for RS256, or EC
  P-256 for ES256), or else a shared secret for HS256: the file's bytes without
  a trailing newline, at least ``MIN_SECRET_BYTES``. Whoever reads a secret can
  mint tokens for every user, so a secret file is held to the rules of zim's
  own token secret (``zim.datadir.check_private_file``: ours, not a symlink,
  not open to group or others); a public key need not be private, but no one
  else may write it (that too would let them mint tokens);
- a JSON Web Key Set (``jwks_file``) of public RSA and EC P-256 keys, each with
  its ``kid``; a token names its key in its header's ``kid``. ``reload()``
  re-reads the file, so keys rotate: a token signed by a key added verifies
  after the reload, one signed by a key removed no longer does.

``verify(token)`` checks, in this order, and refuses with ``JwtRefused`` at the
first failure:

1. the token is a string of at most ``max_token_bytes`` (``MAX_TOKEN_BYTES``
   unless given) ASCII characters (before any parsing);
2. its header's ``alg`` is the one algorithm of its key: HS256 for a secret,
   RS256 for an RSA key, ES256 for an EC key. ``none`` and every other
   algorithm are refused, and so is a token whose ``alg`` does not fit the key:
   an HS256 token "signed" with an RSA public key used as an HMAC secret (the
   HS/RS confusion) never verifies;
3. the signature (PyJWT with ``cryptography``, not hand-written crypto);
4. ``exp`` if present (a token may carry none: the application decides), ``nbf``
   and ``iat`` if present, each a number, with ``leeway`` (``LEEWAY_S``) seconds of leeway
   for clocks a little apart; ``aud`` and ``iss`` when ``audience`` /
   ``issuer`` are configured (a token that carries an ``aud`` is refused when no
   audience is configured, as PyJWT does: it was meant for someone else);
5. ``sub``: required, a non-empty string of at most ``MAX_SUBJECT_CHARS``;
   ``channels``, optional: a list of at most ``MAX_CHANNELS`` channel names
   (each as a join would accept it: ``zim.names.check_channel_name``).

Only then does it return ``JwtClaims``, with those checked values and nothing
else of the token: an unverified claim never gets near the store.

``JwtRefused.code`` is the protocol's error code for a token that is not
accepted: ``unauthorized`` (docs/protocol.md). Its ``reason`` is a short fixed
text, never a piece of the token.
"""
from __future__ import annotations

import math
import os
import stat
from dataclasses import dataclass
from typing import Any

import jwt
import orjson
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from jwt.algorithms import HMACAlgorithm

from zim.datadir import check_file_directory, check_private_file, check_public_file
from zim.limits import DEFAULT_JWT_LEEWAY, DEFAULT_JWT_MAX_BYTES
from zim.names import MAX_CHANNEL_CHARS, check_channel_name

LEEWAY_S = DEFAULT_JWT_LEEWAY            # seconds: exp, nbf and iat tolerate clocks this far apart
MAX_TOKEN_BYTES = DEFAULT_JWT_MAX_BYTES  # a longer token is refused before it is parsed
MAX_SUBJECT_CHARS = 256
MAX_CHANNELS = 1000
MAX_KID_CHARS = 256
MIN_SECRET_BYTES = 32           # HS256: RFC 7518 3.2, a key at least as long as the hash
MIN_RSA_BITS = 2048
MAX_KEY_FILE_BYTES = 1024 * 1024
MAX_NUMERIC_DATE = (1 << 53) - 1    # a JSON-safe integer
ALGORITHMS = ("HS256", "RS256", "ES256")
_PEM = b"-----BEGIN"


class JwtRefused(Exception):
    """A token that is not accepted. ``reason`` is a short safe text (no part of
    the token); ``code`` is the protocol's error code to answer with."""

    code = "unauthorized"

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class JwtKeyError(RuntimeError):
    """A key file or key set that cannot be used (the message says why); unsafe
    permissions raise ``zim.datadir.UnsafeFile``."""


@dataclass(frozen=True)
class JwtClaims:
    """What a verified token says: the user (``sub``), when the token expires
    (``exp``, Unix seconds, None if it carries none) and the channels it grants."""

    subject: str
    expires_at: int | None
    channels: tuple[str, ...]


@dataclass(frozen=True)
class _Key:
    algorithm: str      # the only algorithm a token may use with this key
    key: Any            # bytes (HS256) or a cryptography public key


# the library's exceptions -> our reasons; the first that matches (subclasses first)
_REASONS: tuple[tuple[type[Exception], str], ...] = (
    (jwt.ExpiredSignatureError, "expired"),
    (jwt.ImmatureSignatureError, "not yet valid"),
    (jwt.InvalidAudienceError, "wrong audience"),
    (jwt.InvalidIssuerError, "wrong issuer"),
    (jwt.InvalidSignatureError, "bad signature"),
)
if hasattr(jwt.exceptions, "InvalidSubjectError"):     # PyJWT 2.10 checks that sub is a string
    _REASONS += ((jwt.exceptions.InvalidSubjectError, "bad sub"),)


class JwtKeys:
    """The keys tokens are verified with: ``key_file`` or ``jwks_file`` (exactly
    one), plus the optional ``audience`` and ``issuer`` a token must name.

    Loading raises ``JwtKeyError`` (or ``UnsafeFile``) with what is wrong."""

    def __init__(self, key_file: str | None = None, jwks_file: str | None = None, *,
                 audience: str | None = None, issuer: str | None = None, leeway: int = LEEWAY_S,
                 max_token_bytes: int = MAX_TOKEN_BYTES) -> None:
        if (key_file is None) == (jwks_file is None):
            raise ValueError("give exactly one of key_file and jwks_file")
        self.key_file = key_file
        self.jwks_file = jwks_file
        self.audience = audience
        self.issuer = issuer
        self.leeway = leeway                    # seconds (``LEEWAY_S`` by default)
        self.max_token_bytes = max_token_bytes  # a longer token is refused unparsed
        self._single: _Key | None = None
        self._by_kid: dict[str, _Key] = {}
        self.reload()

    def reload(self) -> None:
        """Read the file again (key rotation). On any error the keys in use stay
        as they were, and the error is raised."""
        if self.key_file is not None:
            self._single = _load_key_file(self.key_file)
        else:
            assert self.jwks_file is not None
            self._by_kid = _load_jwks_file(self.jwks_file)

    @property
    def key_ids(self) -> tuple[str, ...]:
        """The ``kid`` of every key of the key set (none for a key file)."""
        return tuple(self._by_kid)

    def verify(self, token: str) -> JwtClaims:
        """The checked claims of ``token`` (see the module's docstring), or
        ``JwtRefused``; nothing else is ever raised, whatever the input."""
        if not isinstance(token, str):
            raise JwtRefused("not a string")
        if len(token) > self.max_token_bytes:
            raise JwtRefused("token too large")
        if not token.isascii():
            raise JwtRefused("malformed token")
        try:
            header = jwt.get_unverified_header(token)
        except Exception:  # noqa: BLE001 -- client input: refuse, never crash
            raise JwtRefused("malformed token") from None
        key = self._key_for(header)
        if header.get("alg") != key.algorithm:
            raise JwtRefused("algorithm not allowed")
        try:    # algorithms: PyJWT checks the algorithm again (a second guard)
            payload = jwt.decode(token, key.key, algorithms=[key.algorithm], audience=self.audience,
                                 issuer=self.issuer, leeway=self.leeway)
        except Exception as exc:  # noqa: BLE001 -- client input: refuse, never crash
            raise JwtRefused(_reason(exc)) from None
        return _claims(payload)

    def _key_for(self, header: dict[str, Any]) -> _Key:
        if self._single is not None:
            return self._single
        kid = header.get("kid")
        if kid is None:
            raise JwtRefused("no key id")
        if not isinstance(kid, str) or len(kid) > MAX_KID_CHARS:
            raise JwtRefused("malformed token")
        key = self._by_kid.get(kid)
        if key is None:
            raise JwtRefused("unknown key id")
        return key


def _reason(exc: Exception) -> str:
    if isinstance(exc, jwt.MissingRequiredClaimError):     # aud or iss configured, and absent
        return {"aud": "wrong audience", "iss": "wrong issuer"}.get(exc.claim, "malformed token")
    for kind, reason in _REASONS:
        if isinstance(exc, kind):
            return reason
    return "malformed token"


def _claims(payload: Any) -> JwtClaims:
    """The claims kept from a payload whose signature and times PyJWT checked."""
    if not isinstance(payload, dict):
        raise JwtRefused("malformed token")
    for name in ("exp", "nbf", "iat"):       # PyJWT takes int("123") and True as times
        if name in payload and not _numeric_date(payload[name]):
            raise JwtRefused(f"bad {name}")
    if "sub" not in payload:
        raise JwtRefused("missing sub")
    subject = payload["sub"]
    if not isinstance(subject, str) or not 0 < len(subject) <= MAX_SUBJECT_CHARS:
        raise JwtRefused("bad sub")
    expires = payload.get("exp")
    return JwtClaims(subject=subject, expires_at=None if expires is None else int(expires),
                     channels=_channels(payload.get("channels", [])))


def _numeric_date(value: object) -> bool:
    """A JSON number of seconds since the epoch (RFC 7519 2: NumericDate)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return math.isfinite(value) and 0 <= value <= MAX_NUMERIC_DATE


def _channels(value: object) -> tuple[str, ...]:
    """The ``channels`` claim: a list of channel names, duplicates dropped."""
    if not isinstance(value, list) or len(value) > MAX_CHANNELS:
        raise JwtRefused("bad channels")
    for name in value:
        if not isinstance(name, str) or not 0 < len(name) <= MAX_CHANNEL_CHARS:
            raise JwtRefused("bad channels")
        try:
            check_channel_name(name)
        except ValueError:
            raise JwtRefused("bad channels") from None
    return tuple(dict.fromkeys(value))


# ------------------------------------------------------------------ loading keys


def _load_key_file(path: str) -> _Key:
    """A PEM public key (RS256, ES256) or a shared secret (HS256), by content."""
    what = "JWT key file"
    data, info = _read(path, what)
    if data.lstrip().startswith(_PEM):
        check_public_file(path, what, info)
        if b"PRIVATE KEY" in data:
            raise JwtKeyError(f"the {what} {path} holds a private key; give zim only the public key "
                              f"(openssl pkey -in {path} -pubout)")
        try:
            public_key = load_pem_public_key(data)
        except Exception as exc:  # noqa: BLE001 -- cryptography raises several kinds
            raise JwtKeyError(f"the {what} {path} is not a PEM public key zim can read: {exc}") from None
        return _Key(_algorithm_of(public_key, f"the {what} {path}"), public_key)
    named = os.lstat(path)
    if stat.S_ISLNK(named.st_mode):     # as zim's own secret: never through a symlink
        check_private_file(path, what, named)           # raises UnsafeFile, saying so
    check_private_file(path, what, info)                # the file read: ours, 0600
    secret = data[:-1] if data.endswith(b"\n") else data
    if len(secret) < MIN_SECRET_BYTES:
        raise JwtKeyError(f"the {what} {path} holds a secret of {len(secret)} bytes; HS256 needs at "
                          f"least {MIN_SECRET_BYTES}: head -c 32 /dev/urandom | base64 > {path}")
    try:
        HMACAlgorithm(HMACAlgorithm.SHA256).prepare_key(secret)
    except jwt.InvalidKeyError:
        raise JwtKeyError(f"the {what} {path} looks like an asymmetric key, not a shared secret "
                          f"nor a PEM public key") from None
    return _Key("HS256", secret)


def _load_jwks_file(path: str) -> dict[str, _Key]:
    """The public keys of a JSON Web Key Set, by ``kid``."""
    what = "JWKS file"
    data, info = _read(path, what)
    check_public_file(path, what, info)
    try:
        document = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise JwtKeyError(f"the {what} {path} is not JSON: {exc}") from None
    entries = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(entries, list) or not entries:
        raise JwtKeyError(f"the {what} {path} has no \"keys\" list of keys")
    keys: dict[str, _Key] = {}
    for index, entry in enumerate(entries):
        where = f"key {index} of the {what} {path}"
        if not isinstance(entry, dict):
            raise JwtKeyError(f"{where} is not an object")
        kid = entry.get("kid")
        if not isinstance(kid, str) or not 0 < len(kid) <= MAX_KID_CHARS:
            raise JwtKeyError(f"{where} has no \"kid\" (a non-empty string): tokens name their key by it")
        if kid in keys:
            raise JwtKeyError(f"{where} has the same kid as another key: {kid!r}")
        if entry.get("kty") not in ("RSA", "EC"):
            raise JwtKeyError(f"{where} ({kid!r}) is not an RSA or EC public key; a shared secret "
                              f"goes in a key file, private to zim")
        if "d" in entry:
            raise JwtKeyError(f"{where} ({kid!r}) holds a private key; publish only public keys")
        if entry.get("use", "sig") != "sig":
            raise JwtKeyError(f"{where} ({kid!r}) is not for signatures (use: {entry.get('use')!r})")
        try:
            public_key = jwt.PyJWK(entry).key
        except Exception as exc:  # noqa: BLE001 -- PyJWT and cryptography raise several kinds
            raise JwtKeyError(f"{where} ({kid!r}) cannot be read: {exc}") from None
        algorithm = _algorithm_of(public_key, where)
        if entry.get("alg", algorithm) != algorithm:
            raise JwtKeyError(f"{where} ({kid!r}) says alg {entry.get('alg')!r}; zim takes only "
                              f"{algorithm} with such a key")
        keys[kid] = _Key(algorithm, public_key)
    return keys


def _algorithm_of(public_key: object, where: str) -> str:
    """The one algorithm a public key verifies: RS256 or ES256."""
    if isinstance(public_key, rsa.RSAPublicKey):
        if public_key.key_size < MIN_RSA_BITS:
            raise JwtKeyError(f"{where} is an RSA key of {public_key.key_size} bits; zim takes "
                              f"{MIN_RSA_BITS} or more")
        return "RS256"
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        if not isinstance(public_key.curve, ec.SECP256R1):
            raise JwtKeyError(f"{where} is an EC key on {public_key.curve.name}; ES256 needs P-256")
        return "ES256"
    raise JwtKeyError(f"{where} is neither an RSA nor an EC P-256 public key")


def _read(path: str, what: str) -> tuple[bytes, os.stat_result]:
    """The bytes of a key file and the ``fstat`` of what was read; its directory
    must not be open to others' writes (``check_file_directory``)."""
    check_file_directory(path, what)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        raise JwtKeyError(f"cannot read the {what} {path}: {exc}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise JwtKeyError(f"the {what} {path} is not a regular file")
        chunks, size = [], 0
        while size <= MAX_KEY_FILE_BYTES:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError as exc:
        raise JwtKeyError(f"cannot read the {what} {path}: {exc}") from None
    finally:
        os.close(fd)
    if size > MAX_KEY_FILE_BYTES:
        raise JwtKeyError(f"the {what} {path} is over {MAX_KEY_FILE_BYTES} bytes")
    return b"".join(chunks), info
