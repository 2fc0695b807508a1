"""zim.jwtauth: JWT verification and its keys, with real keys made here
(RSA 2048, EC P-256, a random 32-byte secret) and tokens made with PyJWT,
except those PyJWT refuses to make (``alg: none``, the HS/RS confusion), made
by hand. Each test asserts the refusal's reason, so it fails if the check it
is about is removed (another check would refuse with another reason)."""
from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import time
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from hypothesis import given, settings
from hypothesis import strategies as st

from zim.datadir import UnsafeFile
from zim.jwtauth import (LEEWAY_S, MAX_SUBJECT_CHARS, MAX_TOKEN_BYTES, JwtClaims, JwtKeyError, JwtKeys,
                         JwtRefused)

SECRET = os.urandom(32)
RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
RSA_KEY_2 = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())


def pem(private_key) -> bytes:
    return private_key.public_key().public_bytes(serialization.Encoding.PEM,
                                                 serialization.PublicFormat.SubjectPublicKeyInfo)


def write(path: Path, data: bytes, mode: int = 0o600) -> str:
    path.write_bytes(data)
    os.chmod(path, mode)
    return str(path)


def claims(**extra) -> dict:
    return {"sub": "user-1", "exp": int(time.time()) + 3600, **extra}


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def by_hand(header: dict, payload: dict, sign=lambda signing_input: b"") -> str:
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}"
    return f"{signing_input}.{b64(sign(signing_input.encode()))}"


def refused(keys: JwtKeys, token) -> str:
    with pytest.raises(JwtRefused) as info:
        keys.verify(token)
    assert info.value.code == "unauthorized"
    return info.value.reason


@pytest.fixture
def hs(tmp_path) -> JwtKeys:
    return JwtKeys(key_file=write(tmp_path / "secret", SECRET))


@pytest.fixture
def rs(tmp_path) -> JwtKeys:
    return JwtKeys(key_file=write(tmp_path / "rsa.pem", pem(RSA_KEY), 0o644))


@pytest.fixture
def es(tmp_path) -> JwtKeys:
    return JwtKeys(key_file=write(tmp_path / "ec.pem", pem(EC_KEY), 0o644))


def jwk(private_key, kid: str) -> dict:
    algorithm = jwt.algorithms.RSAAlgorithm if isinstance(private_key, rsa.RSAPrivateKey) else jwt.algorithms.ECAlgorithm
    return {**algorithm.to_jwk(private_key.public_key(), as_dict=True), "kid": kid}


def jwks_file(path: Path, *keys: tuple) -> str:
    return write(path, json.dumps({"keys": [jwk(key, kid) for key, kid in keys]}).encode(), 0o644)


# ------------------------------------------------------------------ valid tokens


def test_valid_hs256(hs):
    expires = int(time.time()) + 3600
    result = hs.verify(jwt.encode({"sub": "alice", "exp": expires}, SECRET, "HS256"))
    assert result == JwtClaims(subject="alice", expires_at=expires, channels=())


def test_valid_rs256(rs):
    assert rs.verify(jwt.encode(claims(), RSA_KEY, "RS256")).subject == "user-1"


def test_valid_es256(es):
    assert es.verify(jwt.encode(claims(), EC_KEY, "ES256")).subject == "user-1"


def test_without_exp_verifies_expiring_never(hs):
    assert hs.verify(jwt.encode({"sub": "bob"}, SECRET, "HS256")).expires_at is None


def test_secret_file_trailing_newline_is_stripped(tmp_path):
    keys = JwtKeys(key_file=write(tmp_path / "secret", SECRET + b"\n"))
    assert keys.verify(jwt.encode(claims(), SECRET, "HS256")).subject == "user-1"


def test_only_checked_claims_are_kept(hs):
    result = hs.verify(jwt.encode(claims(name="x", admin=True, channels=["a", "b", "a"]), SECRET, "HS256"))
    assert set(vars(result)) == {"subject", "expires_at", "channels"}
    assert result.channels == ("a", "b")
    with pytest.raises(AttributeError):
        result.subject = "someone else"


# ------------------------------------------------------------------ time


def test_expired(hs):
    now = int(time.time())
    assert refused(hs, jwt.encode(claims(exp=now - LEEWAY_S - 5), SECRET, "HS256")) == "expired"
    # within the leeway: still valid (clocks a little apart)
    assert hs.verify(jwt.encode(claims(exp=now - LEEWAY_S // 2), SECRET, "HS256")).subject == "user-1"


def test_not_yet_valid(hs):
    now = int(time.time())
    assert refused(hs, jwt.encode(claims(nbf=now + LEEWAY_S + 60), SECRET, "HS256")) == "not yet valid"
    assert hs.verify(jwt.encode(claims(nbf=now + LEEWAY_S // 2), SECRET, "HS256")).subject == "user-1"


@pytest.mark.parametrize("name", ["exp", "nbf", "iat"])
@pytest.mark.parametrize("value", ["text", True])
def test_times_must_be_numbers(hs, name, value):
    # PyJWT reads int("1799999999") and int(True); zim takes JSON numbers only
    now = int(time.time())
    if value == "text":     # a time PyJWT accepts, as a string
        value = str(now + 3600 if name == "exp" else now - 3600)
    payload = {**claims(), name: value}
    if value is True and name == "exp":
        assert refused(hs, jwt.encode(payload, SECRET, "HS256")) == "expired"     # 1970
    else:
        assert refused(hs, jwt.encode(payload, SECRET, "HS256")) == f"bad {name}"


# ------------------------------------------------------------------ keys and algorithms


def test_wrong_key(hs, rs, es):
    assert refused(hs, jwt.encode(claims(), os.urandom(32), "HS256")) == "bad signature"
    assert refused(rs, jwt.encode(claims(), RSA_KEY_2, "RS256")) == "bad signature"
    assert refused(es, jwt.encode(claims(), ec.generate_private_key(ec.SECP256R1()), "ES256")) == "bad signature"


def test_tampered_payload(hs):
    header, _, signature = jwt.encode(claims(), SECRET, "HS256").split(".")
    forged = f"{header}.{b64(json.dumps(claims(sub='admin')).encode())}.{signature}"
    assert refused(hs, forged) == "bad signature"


@pytest.mark.parametrize("alg", ["none", "None", "NONE"])
def test_alg_none(hs, rs, es, alg):
    token = by_hand({"alg": alg, "typ": "JWT"}, claims())
    for keys in (hs, rs, es):
        assert refused(keys, token) == "algorithm not allowed"


def test_hs_rs_confusion(rs):
    # the attacker signs HS256 with the RSA public key (which is public) as the HMAC secret
    public_pem = pem(RSA_KEY)
    token = by_hand({"alg": "HS256", "typ": "JWT"}, claims(),
                    lambda data: hmac.new(public_pem, data, hashlib.sha256).digest())
    assert refused(rs, token) == "algorithm not allowed"


def test_algorithm_must_fit_the_key(hs, rs, es):
    assert refused(hs, jwt.encode(claims(), RSA_KEY, "RS256")) == "algorithm not allowed"
    assert refused(rs, jwt.encode(claims(), EC_KEY, "ES256")) == "algorithm not allowed"
    assert refused(es, jwt.encode(claims(), SECRET, "HS256")) == "algorithm not allowed"
    # a stronger variant of the right family is not taken either: one algorithm per key
    assert refused(rs, jwt.encode(claims(), RSA_KEY, "RS512")) == "algorithm not allowed"
    assert refused(hs, jwt.encode(claims(), SECRET * 2, "HS512")) == "algorithm not allowed"


# ------------------------------------------------------------------ sub and channels


@pytest.mark.parametrize("payload, reason", [
    ({}, "missing sub"),
    ({"sub": None}, "bad sub"),
    ({"sub": ""}, "bad sub"),
    ({"sub": 42}, "bad sub"),
    ({"sub": ["a"]}, "bad sub"),
    ({"sub": "x" * (MAX_SUBJECT_CHARS + 1)}, "bad sub"),
])
def test_bad_sub(hs, payload, reason):
    assert refused(hs, jwt.encode(payload, SECRET, "HS256")) == reason


def test_longest_sub(hs):
    assert hs.verify(jwt.encode({"sub": "x" * MAX_SUBJECT_CHARS}, SECRET, "HS256")).subject == "x" * MAX_SUBJECT_CHARS


def test_channels_claim(hs):
    result = hs.verify(jwt.encode(claims(channels=["staff", "room 9", "é"]), SECRET, "HS256"))
    assert result.channels == ("staff", "room 9", "é")
    assert hs.verify(jwt.encode(claims(channels=[]), SECRET, "HS256")).channels == ()


@pytest.mark.parametrize("channels", ["staff", {"staff": True}, ["staff", 1], [None], [""], ["x" * 257],
                                      ["evil\u202e"], ["a\n"], [["nested"]], ["c"] * 1001])
def test_channels_claim_not_a_list_of_names(hs, channels):
    assert refused(hs, jwt.encode(claims(channels=channels), SECRET, "HS256")) == "bad channels"


# ------------------------------------------------------------------ audience and issuer


def test_audience_and_issuer_when_configured(tmp_path):
    keys = JwtKeys(key_file=write(tmp_path / "secret", SECRET), audience="zim", issuer="https://app.example")
    good = claims(aud="zim", iss="https://app.example")
    assert keys.verify(jwt.encode(good, SECRET, "HS256")).subject == "user-1"
    assert refused(keys, jwt.encode({**good, "aud": "other"}, SECRET, "HS256")) == "wrong audience"
    assert refused(keys, jwt.encode({**good, "iss": "https://evil"}, SECRET, "HS256")) == "wrong issuer"
    assert refused(keys, jwt.encode(claims(iss="https://app.example"), SECRET, "HS256")) == "wrong audience"
    assert refused(keys, jwt.encode(claims(aud="zim"), SECRET, "HS256")) == "wrong issuer"


def test_token_for_an_audience_refused_when_none_configured(hs):
    assert refused(hs, jwt.encode(claims(aud="another-service"), SECRET, "HS256")) == "wrong audience"


# ------------------------------------------------------------------ JWKS


def test_jwks_selects_by_kid(tmp_path):
    keys = JwtKeys(jwks_file=jwks_file(tmp_path / "jwks.json", (RSA_KEY, "r1"), (EC_KEY, "e1")))
    assert keys.key_ids == ("r1", "e1")
    assert keys.verify(jwt.encode(claims(sub="a"), RSA_KEY, "RS256", headers={"kid": "r1"})).subject == "a"
    assert keys.verify(jwt.encode(claims(sub="b"), EC_KEY, "ES256", headers={"kid": "e1"})).subject == "b"
    # the right signature under the other key's kid: refused (the kid's algorithm does not fit)
    assert refused(keys, jwt.encode(claims(), EC_KEY, "ES256", headers={"kid": "r1"})) == "algorithm not allowed"


def test_jwks_unknown_or_missing_kid(tmp_path):
    keys = JwtKeys(jwks_file=jwks_file(tmp_path / "jwks.json", (RSA_KEY, "r1")))
    assert refused(keys, jwt.encode(claims(), RSA_KEY, "RS256", headers={"kid": "r9"})) == "unknown key id"
    assert refused(keys, jwt.encode(claims(), RSA_KEY, "RS256")) == "no key id"
    signed = jwt.encode(claims(), RSA_KEY, "RS256", headers={"kid": "r1"}).split(".", 1)[1]
    assert refused(keys, b64(b'{"alg":"RS256","kid":1}') + "." + signed) == "malformed token"


def test_jwks_rotation_by_reload(tmp_path):
    path = tmp_path / "jwks.json"
    keys = JwtKeys(jwks_file=jwks_file(path, (RSA_KEY, "old")))
    old_token = jwt.encode(claims(), RSA_KEY, "RS256", headers={"kid": "old"})
    new_token = jwt.encode(claims(), RSA_KEY_2, "RS256", headers={"kid": "new"})
    assert keys.verify(old_token).subject == "user-1"
    assert refused(keys, new_token) == "unknown key id"
    jwks_file(path, (RSA_KEY, "old"), (RSA_KEY_2, "new"))      # the new key published next to the old
    keys.reload()
    assert keys.verify(new_token).subject == keys.verify(old_token).subject == "user-1"
    jwks_file(path, (RSA_KEY_2, "new"))                         # the old key withdrawn
    keys.reload()
    assert keys.verify(new_token).subject == "user-1"
    assert refused(keys, old_token) == "unknown key id"


def test_failed_reload_keeps_the_keys(tmp_path):
    path = tmp_path / "jwks.json"
    keys = JwtKeys(jwks_file=jwks_file(path, (RSA_KEY, "k")))
    write(path, b"{not json", 0o644)
    with pytest.raises(JwtKeyError):
        keys.reload()
    assert keys.verify(jwt.encode(claims(), RSA_KEY, "RS256", headers={"kid": "k"})).subject == "user-1"


@pytest.mark.parametrize("entry, words", [
    ({"kty": "oct", "k": b64(SECRET), "kid": "s"}, "not an RSA or EC public key"),
    ({**jwk(RSA_KEY, "p"), "d": "AQAB"}, "private key"),
    ({**jwk(RSA_KEY, "p"), "alg": "RS512"}, "alg"),
    ({**jwk(RSA_KEY, "p"), "use": "enc"}, "not for signatures"),
    ({k: v for k, v in jwk(RSA_KEY, "p").items() if k != "kid"}, "kid"),
    ({**jwk(ec.generate_private_key(ec.SECP384R1()), "p")}, "P-256"),
    ({**jwk(rsa.generate_private_key(public_exponent=65537, key_size=1024), "p")}, "1024 bits"),
])
def test_jwks_bad_keys_refused(tmp_path, entry, words):
    path = write(tmp_path / "jwks.json", json.dumps({"keys": [entry]}).encode(), 0o644)
    with pytest.raises(JwtKeyError, match=words):
        JwtKeys(jwks_file=path)


def test_jwks_duplicate_kid_refused(tmp_path):
    with pytest.raises(JwtKeyError, match="same kid"):
        JwtKeys(jwks_file=jwks_file(tmp_path / "jwks.json", (RSA_KEY, "k"), (EC_KEY, "k")))


# ------------------------------------------------------------------ bounds and garbage


def test_token_over_8_kib_refused_before_parsing(hs):
    token = jwt.encode(claims(pad="x" * MAX_TOKEN_BYTES), SECRET, "HS256")    # genuine, but too long
    assert refused(hs, token) == "token too large"
    assert refused(hs, "x" * (MAX_TOKEN_BYTES + 1)) == "token too large"
    fits = jwt.encode(claims(pad="x" * (MAX_TOKEN_BYTES * 3 // 4 - 300)), SECRET, "HS256")
    assert len(fits) <= MAX_TOKEN_BYTES and hs.verify(fits).subject == "user-1"


@pytest.mark.parametrize("token", ["", ".", "..", "a.b.c", "a.b", "é.é.é", None, 12, b"a.b.c"])
def test_malformed(hs, token):
    assert refused(hs, token) in {"malformed token", "not a string"}


@settings(max_examples=300, deadline=None)
@given(text=st.one_of(
    st.text(),
    st.lists(st.one_of(st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_="),
                       st.builds(lambda d: b64(json.dumps(d).encode()),
                                 st.dictionaries(st.sampled_from(["alg", "kid", "sub", "exp", "typ", "crit"]),
                                                 st.one_of(st.text(), st.integers(), st.none(), st.just("HS256"))))),
             min_size=1, max_size=4).map(".".join),
))
def test_garbage_only_ever_refused(tmp_path_factory, text):
    keys = _garbage_keys(tmp_path_factory)
    for key in keys:
        with pytest.raises(JwtRefused):
            key.verify(text)


_KEYS: list[JwtKeys] = []


def _garbage_keys(tmp_path_factory) -> list[JwtKeys]:
    if not _KEYS:
        directory = tmp_path_factory.mktemp("garbage-keys")
        _KEYS.append(JwtKeys(key_file=write(directory / "secret", SECRET)))
        _KEYS.append(JwtKeys(jwks_file=jwks_file(directory / "jwks.json", (RSA_KEY, "k"))))
    return _KEYS


# ------------------------------------------------------------------ key files


def test_world_readable_secret_refused(tmp_path):
    with pytest.raises(UnsafeFile, match="chmod 600"):
        JwtKeys(key_file=write(tmp_path / "secret", SECRET, 0o644))
    with pytest.raises(UnsafeFile):
        JwtKeys(key_file=write(tmp_path / "secret2", SECRET, 0o640))


def test_secret_symlink_refused(tmp_path):
    target = write(tmp_path / "secret", SECRET)
    os.symlink(target, tmp_path / "link")
    with pytest.raises(UnsafeFile, match="symbolic link"):
        JwtKeys(key_file=str(tmp_path / "link"))


def test_short_secret_refused(tmp_path):
    with pytest.raises(JwtKeyError, match="31 bytes"):
        JwtKeys(key_file=write(tmp_path / "secret", SECRET[:31] + b"\n"))


def test_public_key_may_be_world_readable_but_not_writable(tmp_path):
    JwtKeys(key_file=write(tmp_path / "rsa.pem", pem(RSA_KEY), 0o644))
    with pytest.raises(UnsafeFile, match="chmod go-w"):
        JwtKeys(key_file=write(tmp_path / "rsa2.pem", pem(RSA_KEY), 0o666))
    path = jwks_file(tmp_path / "jwks.json", (RSA_KEY, "k"))
    JwtKeys(jwks_file=path)
    os.chmod(path, 0o646)
    with pytest.raises(UnsafeFile, match="chmod go-w"):
        JwtKeys(jwks_file=path)


def test_private_key_pem_refused(tmp_path):
    private = RSA_KEY.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
    with pytest.raises(JwtKeyError, match="private key"):
        JwtKeys(key_file=write(tmp_path / "rsa.key", private))


def test_weak_or_wrong_curve_pem_refused(tmp_path):
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    with pytest.raises(JwtKeyError, match="1024 bits"):
        JwtKeys(key_file=write(tmp_path / "small.pem", pem(small), 0o644))
    with pytest.raises(JwtKeyError, match="P-256"):
        JwtKeys(key_file=write(tmp_path / "p384.pem", pem(ec.generate_private_key(ec.SECP384R1())), 0o644))


def test_exactly_one_source():
    with pytest.raises(ValueError):
        JwtKeys()
    with pytest.raises(ValueError):
        JwtKeys(key_file="a", jwks_file="b")
