"""Token lifetimes (issue 14): tokens expire (``--token-ttl``) and are renewed by
action 10; one user's tokens are revoked by action 11 ("log out everywhere")
without touching anyone else's, on one process, on workers and on nodes; the
tokens of zim before version 2 are accepted only for one lifetime after the
upgrade, and never once revoked.

Unit tests of the token format first (no server), then real servers."""
from __future__ import annotations

import os
import sqlite3
import time

import pytest

from tests.support.servers import durable_store_on_a_test_link
from tests.support.node_servers import backend_fixture
from tests.support.redis_servers import requires_redis_server
from tests.support.client import unique

from zim import tokens
from zim.ids import wall_clock_ms
from zim.storage.sqlite import SQLiteStore
from zim.storage.store import MemoryStore
from zim.tokens import Claims, make_token, make_v1_token, verify_token

SECRET = bytes(range(32))
OTHER = bytes(range(1, 33))
LATER = 4_000_000_000_000       # some time in 2096, Unix ms


def write_secret(path, secret: bytes = SECRET) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, secret)
    finally:
        os.close(fd)
    os.chmod(path, 0o600)


# ------------------------------------------------------------------ the format


def test_a_token_carries_user_epoch_and_expiry_under_the_hmac():
    token = make_token(SECRET, 42, 7, LATER)
    assert verify_token(SECRET, token) == Claims(42, 7, LATER, 2)
    head, signature = token.rsplit(".", 1)
    # every field is signed: changing one (with the same signature) is a forgery
    for forged in (f"v2.43.7.{LATER}", f"v2.42.8.{LATER}", f"v2.42.6.{LATER}", f"v2.42.7.{LATER + 1}",
                   f"v2.42.7.{LATER - 1}", f"v2.42.0.{LATER}", "v2.42.7.9999999999999"):
        assert verify_token(SECRET, f"{forged}.{signature}") is None, forged
    assert verify_token(OTHER, token) is None
    assert verify_token(SECRET, head + "." + make_token(OTHER, 42, 7, LATER).rsplit(".", 1)[1]) is None


def test_signatures_are_compared_in_constant_time(monkeypatch):
    calls = []
    real = tokens.hmac.compare_digest

    def spy(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(tokens.hmac, "compare_digest", spy)
    token = make_token(SECRET, 42, 1, LATER)
    assert verify_token(SECRET, token) is not None
    assert verify_token(SECRET, token[:-1] + ("A" if token[-1] != "A" else "B")) is None
    assert verify_token(SECRET, make_v1_token(SECRET, 42)) is not None
    assert len(calls) == 3      # every signature check, v1 included, goes through compare_digest


def test_expiry_is_in_the_claims():
    claims = verify_token(SECRET, make_token(SECRET, 5, 0, 1_000_000))
    assert claims.valid_at(999_999) and not claims.valid_at(1_000_000) and not claims.valid_at(2_000_000)


def test_version_1_tokens_are_recognised_as_such():
    old = make_v1_token(SECRET, 42)
    assert old.startswith("42.") and old.count(".") == 1
    assert verify_token(SECRET, old) == Claims(42, 0, 0, 1)
    assert verify_token(OTHER, old) is None
    assert verify_token(SECRET, "43." + old.split(".")[1]) is None


@pytest.mark.parametrize("epoch,expires", [(-1, LATER), (1 << 32, LATER), (0, 0), (0, -5), (0, 1 << 60)])
def test_make_token_refuses_bad_fields(epoch, expires):
    with pytest.raises(ValueError):
        make_token(SECRET, 42, epoch, expires)


# ------------------------------------------------------------------ stores


def test_memory_store_revokes_one_user_only():
    store = MemoryStore()
    store.create_user(1, "a")
    store.create_user(2, "b")
    assert store.token_epoch(1) == store.token_epoch(2) == 0
    assert store.revoke_tokens(1) == 1
    assert store.revoke_tokens(1) == 2
    assert (store.token_epoch(1), store.token_epoch(2)) == (2, 0)
    with pytest.raises(KeyError):
        store.revoke_tokens(3)


def test_sqlite_keeps_token_epochs_and_never_lowers_them(tmp_path):
    path = str(tmp_path / "zim.db")
    db = SQLiteStore(path)
    db.create_user(1, "a")
    db.create_user(2, "b")
    db.set_token_epoch(1, 3)
    db.set_token_epoch(1, 2)            # an older write arriving late: stays 3
    with pytest.raises(KeyError):
        db.set_token_epoch(9, 1)
    assert db.tokens_v2_since() == 0    # made with version 2: no version 1 token names its users
    assert db.revoke_tokens(1) == 4 and db.token_epoch(1) == 4
    db.set_token_epoch(1, 3)
    db.close()
    db = SQLiteStore(path)
    assert list(db.all_token_epochs()) == [(1, 4)]
    assert (db.token_epoch(1), db.token_epoch(2)) == (4, 0)
    db.close()


def test_durable_store_counts_a_revocation_at_once_and_undoes_a_failed_one(tmp_path):
    from zim.storage.writer import FAILED, OK, OP_TOKEN_EPOCH

    with durable_store_on_a_test_link(tmp_path) as store:
        store.meta.create_user(1, "alice")
        first = store.revoke_tokens(1)
        assert store.token_epoch(1) == 1            # before the commit: a login now is refused
        store.on_link_packet(OP_TOKEN_EPOCH, OK, b"null")
        assert first.outcome == (True, 1)
        second = store.revoke_tokens(1)
        assert store.token_epoch(1) == 2
        store.on_link_packet(OP_TOKEN_EPOCH, FAILED, b'"disk full"')
        assert second.outcome[0] is False and store.token_epoch(1) == 1


OLD_SCHEMA = """
CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT NOT NULL);
CREATE TABLE channels (name TEXT PRIMARY KEY) WITHOUT ROWID;
CREATE TABLE members (channel TEXT NOT NULL, user_id INTEGER NOT NULL, push INTEGER NOT NULL,
                      PRIMARY KEY (channel, user_id));
CREATE INDEX members_by_user ON members(user_id);
CREATE TABLE conversations (conv TEXT PRIMARY KEY, last_seq INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE messages (conv TEXT NOT NULL, seq INTEGER NOT NULL, id TEXT NOT NULL, body BLOB NOT NULL,
                       created_at INTEGER, PRIMARY KEY (conv, seq)) WITHOUT ROWID;
CREATE TABLE mailbox (user_id INTEGER NOT NULL, msg_id TEXT NOT NULL, conv TEXT NOT NULL,
                      seq INTEGER NOT NULL, PRIMARY KEY (user_id, msg_id));
CREATE INDEX mailbox_by_user ON mailbox(user_id);
CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
PRAGMA user_version = 2;
"""


def old_database(path, users: dict[int, str]) -> None:
    """A database as zim wrote it before tokens expired (schema version 2)."""
    conn = sqlite3.connect(str(path))
    conn.executescript(OLD_SCHEMA)
    conn.executemany("INSERT INTO users(id, name) VALUES (?, ?)", users.items())
    conn.commit()
    conn.close()
    os.chmod(path, 0o600)


def test_an_upgraded_database_records_when_version_1_tokens_began_to_run_out(tmp_path):
    old_database(tmp_path / "zim.db", {5: "old"})
    before = wall_clock_ms()
    db = SQLiteStore(str(tmp_path / "zim.db"))
    assert before <= db.tokens_v2_since() <= wall_clock_ms()
    assert db.token_epoch(5) == 0
    db.set_token_epoch(5, 1)
    db.close()
    db = SQLiteStore(str(tmp_path / "zim.db"))        # opened again: the time stays the first one
    assert db.tokens_v2_since() <= before + 5000 and db.token_epoch(5) == 1
    db.close()


# ------------------------------------------------------------------ servers


@pytest.mark.parametrize("workers", ["1", "3"])
def test_an_expired_token_is_unauthorized_and_refresh_renews(start_server, workers):
    srv = start_server(flags=("--workers", workers, "--token-ttl", "3s"))
    alice = srv.tcp_client()
    start = wall_clock_ms()
    first = alice.login(unique("alice"))
    assert start + 2900 <= first["expiresAt"] <= wall_clock_ms() + 3100
    time.sleep(1.5)
    refreshed = alice.ok(10)
    assert set(refreshed) == {"token", "expiresAt"}
    assert refreshed["expiresAt"] >= first["expiresAt"] + 1000 and refreshed["token"] != first["token"]
    # before its expiry the first token still works (and a login renews too)
    again = srv.tcp_client()
    assert again.login(alice.name, token=first["token"])["id"] == alice.user_id
    while wall_clock_ms() <= first["expiresAt"] + 50:
        time.sleep(0.05)
    late = srv.ws_client()
    assert late.error(1, {"name": alice.name, "token": first["token"]}) == "unauthorized"
    late.login(alice.name, token=refreshed["token"])      # the refreshed one lives on
    assert late.user_id == alice.user_id
    # a connection logged in long ago refreshes, whatever its login token's age
    assert alice.ok(10)["expiresAt"] > refreshed["expiresAt"]


def test_token_ttl_flag_is_checked(tmp_path):
    from tests.storage.test_storage_durable import run_server_expecting_failure

    for bad in ("0", "500ms", "soon", "-1s"):
        result = run_server_expecting_failure(tmp_path / "data", "--token-ttl", bad)
        assert result.returncode == 2 and "--token-ttl" in result.stderr, (bad, result.stderr)


@pytest.mark.parametrize("workers", ["1", "3"])
def test_log_out_everywhere_revokes_one_users_tokens_only(start_server, workers):
    srv = start_server(flags=("--workers", workers))
    alice = srv.tcp_client()
    alice.login(unique("alice"))
    old = alice.token
    # her other devices, likely spread over the workers
    devices = [srv.client("ws" if i % 2 else "tcp") for i in range(6)]
    for device in devices:
        device.login(alice.name, token=old)
    device_token = devices[0].token
    bob = srv.tcp_client()
    bob.login(unique("bob"))

    answer = alice.ok(11)
    assert set(answer) == {"token", "expiresAt"} and answer["token"] != old
    for device in devices:
        device.wait_closed(5)           # every other connection of hers is logged out
    for token in (old, device_token):
        stranger = srv.tcp_client()
        assert stranger.error(1, {"name": alice.name, "token": token}) == "unauthorized"
        assert stranger.error(10) == "not_logged_in"
    # her calling connection stays, and its new token works
    assert "time" in alice.ok(9)
    phone = srv.ws_client()
    assert phone.login(alice.name, token=answer["token"])["id"] == alice.user_id
    # bob: untouched, his connection and his token
    assert "time" in bob.ok(9)
    bob_phone = srv.tcp_client()
    assert bob_phone.login(bob.name, token=bob.token)["id"] == bob.user_id
    # the revocation is stored: after a restart the old token is still refused
    data = srv.data_dir
    srv.stop()
    again = start_server(flags=("--workers", workers), data_dir=data)
    client = again.tcp_client()
    assert client.error(1, {"name": alice.name, "token": old}) == "unauthorized"
    assert client.login(alice.name, token=answer["token"])["id"] == alice.user_id
    assert again.tcp_client().login(bob.name, token=bob.token)["id"] == bob.user_id


def test_a_refresh_after_log_out_everywhere_carries_the_new_epoch(start_server):
    srv = start_server(flags=("--workers", "1", "--store", "memory"))
    alice = srv.tcp_client()
    alice.login(unique("alice"))
    alice.ok(11)
    refreshed = alice.ok(10)["token"]
    assert verify_token_epoch(refreshed) == 1
    assert srv.tcp_client().login(alice.name, token=refreshed)["id"] == alice.user_id
    alice.ok(11)
    assert srv.tcp_client().error(1, {"name": alice.name, "token": refreshed}) == "unauthorized"


def verify_token_epoch(token: str) -> int:
    return int(token.split(".")[2])


def test_version_1_tokens_are_refused_on_a_new_database(start_server):
    srv = start_server(flags=("--workers", "1"))
    alice = srv.tcp_client()
    alice.login(unique("alice"))
    secret = (srv.data_dir / "secret").read_bytes()
    old = make_v1_token(secret, int(alice.user_id))
    assert srv.tcp_client().error(1, {"name": alice.name, "token": old}) == "unauthorized"


def test_version_1_tokens_last_one_lifetime_after_the_upgrade_unless_revoked(start_server, tmp_path):
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    write_secret(data / "secret")
    old_database(data / "zim.db", {101: "old-a", 102: "old-b"})
    srv = start_server(flags=("--workers", "1", "--token-ttl", "3s"), data_dir=data)
    upgraded = wall_clock_ms()
    a, b = make_v1_token(SECRET, 101), make_v1_token(SECRET, 102)
    first = srv.tcp_client()
    answer = first.login("old-a", token=a)
    assert answer["id"] == "101" and answer["token"].startswith("v2.101.0.")   # the client's new token
    # revoked: the old token goes at once
    first.ok(11)
    assert srv.tcp_client().error(1, {"name": "old-a", "token": a}) == "unauthorized"
    # not revoked: it works until the upgrade's time + the token lifetime
    assert srv.tcp_client().login("old-b", token=b)["id"] == "102"
    while wall_clock_ms() < upgraded + 3300:
        time.sleep(0.05)
    assert srv.tcp_client().error(1, {"name": "old-b", "token": b}) == "unauthorized"


# ------------------------------------------------------------------ nodes


@pytest.fixture(scope="module")
def redis_backend():
    yield from backend_fixture("redis")


@pytest.fixture(scope="module")
def node_secret(tmp_path_factory):
    """One secret file for every node of the module's Redis (nodes refuse another one)."""
    path = tmp_path_factory.mktemp("node-secret") / "secret"
    write_secret(path, os.urandom(32))
    return path


@requires_redis_server
def test_log_out_everywhere_on_one_node_counts_on_the_other_at_once(redis_backend, start_server, node_secret):
    secret_file = node_secret
    flags = ("--workers", "2", "--redis", redis_backend.url, "--secret-file", str(secret_file),
             "--token-ttl", "1h")
    a, b = start_server(flags=flags), start_server(flags=flags)
    alice = a.tcp_client()
    alice.login(unique("alice"))
    old = alice.token
    on_b = [b.tcp_client() for _ in range(3)]
    for device in on_b:
        device.login(alice.name, token=old)
    bob = b.tcp_client()
    bob.login(unique("bob"))
    refreshed = alice.ok(10)
    assert wall_clock_ms() + 3_500_000 < refreshed["expiresAt"] <= wall_clock_ms() + 3_600_000

    answer = alice.ok(11)
    # at once on the other node: its cached epoch is not trusted for a token login
    assert b.tcp_client().error(1, {"name": alice.name, "token": old}) == "unauthorized"
    assert b.tcp_client().error(1, {"name": alice.name, "token": refreshed["token"]}) == "unauthorized"
    for device in on_b:
        device.wait_closed(5)           # her connections on the other node are closed too
    assert b.tcp_client().login(alice.name, token=answer["token"])["id"] == alice.user_id
    assert "time" in bob.ok(9)
    assert a.tcp_client().login(bob.name, token=bob.token)["id"] == bob.user_id
    # a refresh on B knows the new epoch
    again = b.tcp_client()
    again.login(alice.name, token=answer["token"])
    assert verify_token_epoch(again.ok(10)["token"]) == 1


@requires_redis_server
def test_expired_tokens_are_refused_on_nodes(redis_backend, start_server, node_secret):
    secret_file = node_secret
    srv = start_server(flags=("--workers", "1", "--redis", redis_backend.url, "--secret-file",
                              str(secret_file), "--token-ttl", "2s"))
    alice = srv.tcp_client()
    first = alice.login(unique("alice"))
    while wall_clock_ms() <= first["expiresAt"] + 50:
        time.sleep(0.05)
    assert srv.tcp_client().error(1, {"name": alice.name, "token": first["token"]}) == "unauthorized"
    assert srv.tcp_client().login(alice.name, token=alice.ok(10)["token"])["id"] == alice.user_id
