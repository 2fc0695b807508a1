"""JWT logins (action 1 ``{"jwt": ...}``) against real servers: HS256 with
``--anonymous-login off`` on one process with the memory store, RS256 with 3
workers, ES256 and RS256 from a JWKS file that rotates while the server runs.
Tokens are made with PyJWT from keys made here (tests/identity/test_jwtauth.py),
those PyJWT refuses to make (``alg: none``, the HS/RS confusion) by hand."""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import secrets
import subprocess
import sys
import time

import jwt
import pytest

from tests.identity.test_jwtauth import EC_KEY, RSA_KEY, RSA_KEY_2, SECRET, by_hand, jwk, pem, write
from tests.server.test_metrics import Scraper
from tests.support.client import error_code, unique
from tests.support.servers import free_port
from zim.client.aio import Client

LOGIN, SUBSCRIBE, SEND_CHANNEL = 1, 3, 4


def user_number() -> str:
    """A fresh decimal user id (the application's numbering)."""
    return str(secrets.randbits(56) + 1)


def token(key, algorithm: str = "HS256", headers: dict | None = None, **claims) -> str:
    payload = {"sub": user_number(), "exp": int(time.time()) + 600, **claims}
    return jwt.encode(payload, key, algorithm, headers=headers)


@pytest.fixture(scope="module")
def key_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("jwt-keys")
    os.chmod(directory, 0o700)
    return directory


@pytest.fixture(scope="module")
def hs_server(start_module_server, key_dir):
    """HS256, one process, the memory store, no anonymous logins, metrics on."""
    metrics = free_port()
    srv = start_module_server(["--workers", "1", "--store", "memory", "--anonymous-login", "off",
                               "--jwt-key", write(key_dir / "secret", SECRET), "--metrics", f"127.0.0.1:{metrics}"])
    srv.metrics_port = metrics
    return srv


@pytest.fixture(scope="module")
def rs_server(start_module_server, key_dir):
    """RS256 from a PEM public key, 3 workers (handlers in the router), SQLite."""
    return start_module_server(["--workers", "3", "--jwt-key", write(key_dir / "rsa.pem", pem(RSA_KEY), 0o644)])


def jwt_login(srv, encoded: str, **body) -> dict:
    client = srv.tcp_client()
    return client.call(LOGIN, {"jwt": encoded, **body})


def refused(srv, encoded, **body) -> str:
    answer = jwt_login(srv, encoded, **body)
    assert error_code(answer) == "unauthorized", answer
    return answer["error"]["message"]


# ------------------------------------------------------------------ valid tokens


def test_hs256_first_login_creates_the_user_later_ones_resume_it(hs_server):
    sub = user_number()
    first = jwt_login(hs_server, token(SECRET, sub=sub), name="Ann")
    assert first["id"] == sub and first["token"] and first["expiresAt"] > time.time() * 1000
    assert first["name"] == "Ann"       # a JWT login answers the name (to resume with the token)
    # again, without a name: the same user, its name kept; the zim token serves reconnects
    again = hs_server.tcp_client()
    assert again.login(None, jwt=token(SECRET, sub=sub))["id"] == sub
    peer = hs_server.tcp_client()
    peer.login(None, jwt=token(SECRET))
    channel = unique("hs")
    for client in (again, peer):
        client.ok(SUBSCRIBE, {"name": channel})
    again.ok(SEND_CHANNEL, {"channel": channel, "content": "hello"})
    assert peer.recv_push()[1]["sender"] == {"id": sub, "name": "Ann"}
    resumed = hs_server.tcp_client()
    assert resumed.login("Ann", token=first["token"])["id"] == sub


def test_a_new_user_without_a_name_is_named_by_its_sub(hs_server):
    sub = user_number()
    alice = hs_server.tcp_client()
    alice.login(None, jwt=token(SECRET, sub=sub))
    channel = unique("named")
    alice.ok(SUBSCRIBE, {"name": channel})
    alice.ok(SEND_CHANNEL, {"channel": channel, "content": "x"})
    history = alice.ok(5, {"channel": channel})["messages"]
    assert history[0]["sender"] == {"id": sub, "name": sub}


def test_rs256_with_workers(rs_server):
    sub = user_number()
    clients = [rs_server.tcp_client() for _ in range(4)]       # spread over the workers
    assert {client.login("Rita", jwt=token(RSA_KEY, "RS256", sub=sub))["id"] for client in clients} == {sub}


# ------------------------------------------------------------------ refused tokens


def test_expired_wrong_key_and_no_algorithm_refused(hs_server):
    now = int(time.time())
    assert "expired" in refused(hs_server, token(SECRET, exp=now - 120))
    assert "bad signature" in refused(hs_server, token(os.urandom(32)))
    assert "algorithm" in refused(hs_server, token(RSA_KEY, "RS256"))
    for alg in ("none", "None"):
        assert "algorithm" in refused(hs_server, by_hand({"alg": alg, "typ": "JWT"},
                                                         {"sub": user_number(), "exp": now + 600}))


def test_hs_rs_confusion_refused(rs_server):
    """An HS256 token "signed" with the server's RSA public key as the HMAC secret."""
    forged = by_hand({"alg": "HS256", "typ": "JWT"}, {"sub": user_number(), "exp": int(time.time()) + 600},
                     lambda signing_input: hmac.new(pem(RSA_KEY), signing_input, hashlib.sha256).digest())
    assert "algorithm" in refused(rs_server, forged)
    assert "bad signature" in refused(rs_server, token(RSA_KEY_2, "RS256"))


@pytest.mark.parametrize("sub", ["alice", "007", "0", "-5", "1.5", " 12", "１２", str(1 << 63), ""])
def test_sub_must_be_a_decimal_user_id(hs_server, sub):
    assert "sub must be a decimal user id" in refused(hs_server, token(SECRET, sub=sub))


def test_missing_sub_refused(hs_server):
    assert "missing sub" in refused(hs_server, jwt.encode({"exp": int(time.time()) + 60}, SECRET, "HS256"))


def test_largest_sub_accepted(hs_server):
    assert jwt_login(hs_server, token(SECRET, sub=str((1 << 63) - 1)))["id"] == str((1 << 63) - 1)


def test_bad_bodies(hs_server):
    client = hs_server.tcp_client()
    assert client.error(LOGIN, {"jwt": 12}) == "bad_request"
    assert client.error(LOGIN, {"jwt": token(SECRET), "token": "x"}) == "bad_request"
    assert client.error(LOGIN, {"jwt": token(SECRET), "name": ""}) == "bad_request"
    assert client.error(LOGIN, {"jwt": "x" * 9000}) == "unauthorized"       # over --jwt-max-bytes


def test_anonymous_login_off(hs_server):
    answer = hs_server.tcp_client().call(LOGIN, {"name": "anon"})
    assert answer["error"]["code"] == "unauthorized" and "anonymous" in answer["error"]["message"]


def test_refusals_are_counted_by_reason(hs_server):
    scraper = Scraper(hs_server.metrics_port)
    before = scraper.value("zim_jwt_refusals_total", reason="expired")
    refused(hs_server, token(SECRET, exp=int(time.time()) - 300))
    scraper.wait(lambda got: got.get(("zim_jwt_refusals_total", (("reason", "expired"),)), 0) == before + 1,
                 "the refusal counted")


def test_a_server_without_keys_refuses_jwts(server):
    answer = server.tcp_client().call(LOGIN, {"jwt": token(SECRET)})
    assert error_code(answer) == "unauthorized" and "no JWT" in answer["error"]["message"]


def test_failed_jwts_take_the_address_out_of_auth_failures(start_server, key_dir):
    srv = start_server(["--workers", "1", "--store", "memory", "--jwt-key", write(key_dir / "limited", SECRET),
                        "--address-auth-failure-rate", "0.1"])   # a burst of one failure
    assert "bad signature" in refused(srv, token(os.urandom(32)))
    assert error_code(jwt_login(srv, token(SECRET))) == "rate_limited"


# ------------------------------------------------------------------ key rotation


def test_jwks_rotation_while_the_server_runs(start_server, key_dir):
    path = key_dir / "jwks.json"
    write(path, json.dumps({"keys": [jwk(RSA_KEY, "old"), jwk(EC_KEY, "ec")]}).encode(), 0o644)
    srv = start_server(["--workers", "1", "--store", "memory", "--jwt-jwks", str(path)])
    assert "id" in jwt_login(srv, token(RSA_KEY, "RS256", headers={"kid": "old"}))
    assert "id" in jwt_login(srv, token(EC_KEY, "ES256", headers={"kid": "ec"}))
    assert "unknown key id" in refused(srv, token(RSA_KEY_2, "RS256", headers={"kid": "new"}))
    # rotate: the new key in, the old one out (written aside and renamed, as a deploy would)
    aside = key_dir / "jwks.json.next"
    write(aside, json.dumps({"keys": [jwk(RSA_KEY_2, "new")]}).encode(), 0o644)
    os.replace(aside, path)
    deadline = time.monotonic() + 5
    while error_code(answer := jwt_login(srv, token(RSA_KEY_2, "RS256", headers={"kid": "new"}))):
        assert time.monotonic() < deadline, answer
        time.sleep(0.2)
    assert "unknown key id" in refused(srv, token(RSA_KEY, "RS256", headers={"kid": "old"}))
    # a broken file is logged; the keys in use stay
    write(path, b"{not json", 0o644)
    deadline = time.monotonic() + 5
    while "JWT keys not reloaded" not in srv.stderr():
        assert time.monotonic() < deadline, "the broken file was not noticed"
        time.sleep(0.1)
    assert "id" in jwt_login(srv, token(RSA_KEY_2, "RS256", headers={"kid": "new"}))


# ------------------------------------------------------------------ the Python client


def test_the_asyncio_client_logs_in_with_a_jwt_and_reconnects_with_its_token(hs_server):
    sub = user_number()

    async def scenario() -> None:
        url = f"tcp://127.0.0.1:{hs_server.tcp_port}"
        async with Client(url, jwt=token(SECRET, sub=sub), backoff=(0.05, 0.2)) as client:
            assert client.user_id == sub and client.token and client.jwt is None and client.name == sub
            channel = unique("aio")
            await client.join(channel)
            first_token = client.token
            client.drop_connection()                   # as a network failure: it logs in again
            deadline = time.monotonic() + 5
            while not client.reconnects:
                assert time.monotonic() < deadline, "no reconnect"
                await asyncio.sleep(0.05)
            await client.send_channel(channel, "after the reconnect")
            assert client.user_id == sub and client.token != first_token

    asyncio.run(scenario())


def test_bad_jwt_flags_stop_the_server_before_it_starts(tmp_path, zim_env):
    def run(*flags: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "zim", "--tcp", "off", "--ws", "off", "--workers", "1",
                               "--data", str(tmp_path / "data"), *flags],
                              env=zim_env, capture_output=True, text=True, timeout=30)

    loose = write(tmp_path / "loose", SECRET, 0o644)      # a secret others may read
    done = run("--jwt-key", loose)
    assert done.returncode == 1 and "loose" in done.stderr, done.stderr
    done = run("--anonymous-login", "off")
    assert done.returncode == 2 and "--anonymous-login off needs --jwt-key or --jwt-jwks" in done.stderr
    done = run("--jwt-key", loose, "--jwt-jwks", loose)
    assert done.returncode == 2 and "one of --jwt-key and --jwt-jwks" in done.stderr
