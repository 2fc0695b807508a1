"""The data directory is private (issue 14): created 0700 with files 0600; a
directory, secret or database owned by another user or writable by others is
refused with a message saying what to run, as sshd refuses loose key files; the
secret is never read or written through a symlink, and its temporary file is
made with O_EXCL|O_NOFOLLOW. Nodes read the secret from ``--secret-file``.

Every check reads ``st_mode``/``st_uid``, so these hold when the tests run as root."""
from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest
from tests.support.servers import HOST, free_port, server_env
from tests.support.node_servers import backend_fixture
from tests.support.redis_servers import requires_redis_server
from tests.support.client import unique

from zim.datadir import UnsafeFile
from zim.nodes import schema
from zim.tokens import SECRET_BYTES, load_or_create_secret

is_root = os.geteuid() == 0


def mode(path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def run_server(*flags: str) -> subprocess.CompletedProcess:
    """A server that is expected to refuse to start."""
    return subprocess.run(
        [sys.executable, "-m", "zim", "--tcp", f"{HOST}:{free_port()}", "--ws", f"{HOST}:{free_port()}",
         "--workers", "1", *flags],
        capture_output=True, text=True, timeout=30, env=server_env())


def refused(result: subprocess.CompletedProcess, *words: str) -> None:
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    for word in words:
        assert word in result.stderr, (word, result.stderr)


def private_dir(path):
    path.mkdir(mode=0o700)
    os.chmod(path, 0o700)
    return path


def secret_file(path, content: bytes | None = None, file_mode: int = 0o600):
    path.write_bytes(content if content is not None else os.urandom(SECRET_BYTES))
    os.chmod(path, file_mode)
    return path


# ------------------------------------------------------------------ modes


@pytest.mark.parametrize("workers", ["1", "3"])
def test_a_new_data_directory_is_0700_and_its_files_0600(start_server, tmp_path, workers):
    data = tmp_path / "deep" / "data"
    old_umask = os.umask(0o022)     # what a shell usually has; the server must not depend on it
    try:
        srv = start_server(flags=("--workers", workers), data_dir=data)
    finally:
        os.umask(old_umask)
    alice, bob = srv.tcp_client(), srv.tcp_client()
    alice.login(unique("alice"))
    bob.login(unique("bob"))
    alice.ok(2, {"receiverId": bob.user_id, "content": "private"})
    assert mode(data) == 0o700
    names = sorted(os.listdir(data))
    assert {"secret", "zim.db"} <= set(names), names
    for name in names:
        assert mode(data / name) == 0o600, (name, oct(mode(data / name)))
    srv.stop()
    for name in os.listdir(data):
        assert mode(data / name) == 0o600, name


def test_a_data_directory_and_database_of_an_older_zim_are_tightened(start_server, tmp_path):
    """zim made them 0755 and 0644 before: readable, not writable, by others.
    Tightening loses nothing; refusing would stop every upgraded server."""
    data = tmp_path / "data"
    data.mkdir()
    os.chmod(data, 0o755)
    secret_file(data / "secret")
    (data / "zim.db").write_bytes(b"")
    os.chmod(data / "zim.db", 0o644)
    srv = start_server(flags=("--workers", "1"), data_dir=data)
    assert mode(data) == 0o700 and mode(data / "zim.db") == 0o600
    assert "made it 0600" in srv.stderr() and "made it 0700" in srv.stderr()
    srv.tcp_client().login(unique("u"))


@pytest.mark.parametrize("dir_mode", [0o777, 0o770, 0o703, 0o1777])
def test_a_data_directory_others_may_write_is_refused(tmp_path, dir_mode):
    data = tmp_path / "data"
    data.mkdir()
    os.chmod(data, dir_mode)
    refused(run_server("--data", str(data)), "data directory", "writable", f"chmod 700 {data}")
    assert os.listdir(data) == [], "nothing may be created in a refused directory"
    assert mode(data) == dir_mode, "refused, not changed"


@pytest.mark.parametrize("file_mode", [0o644, 0o666, 0o640, 0o604, 0o620, 0o602])
def test_a_secret_open_to_others_is_refused(tmp_path, file_mode):
    data = private_dir(tmp_path / "data")
    secret = secret_file(data / "secret", file_mode=file_mode)
    content = secret.read_bytes()
    refused(run_server("--data", str(data)), "token secret", f"{file_mode:04o}", f"chmod 600 {secret}")
    assert secret.read_bytes() == content and mode(secret) == file_mode, "refused, never changed or replaced"
    assert not (data / "zim.db").exists()


@pytest.mark.parametrize("file_mode", [0o666, 0o646, 0o620])
def test_a_database_others_may_write_is_refused(tmp_path, file_mode):
    data = private_dir(tmp_path / "data")
    secret_file(data / "secret")
    (data / "zim.db").write_bytes(b"")
    os.chmod(data / "zim.db", file_mode)
    refused(run_server("--data", str(data)), "database", f"chmod 600 {data / 'zim.db'}")
    assert mode(data / "zim.db") == file_mode


def test_a_wal_file_others_may_write_is_refused(tmp_path):
    data = private_dir(tmp_path / "data")
    secret_file(data / "secret")
    (data / "zim.db-wal").write_bytes(b"")
    os.chmod(data / "zim.db-wal", 0o666)
    refused(run_server("--data", str(data)), "zim.db-wal", "chmod 600")


# ------------------------------------------------------------------ symlinks


def test_a_planted_symlink_for_the_secrets_temporary_file_is_refused(tmp_path):
    """In process, so the temporary file's name (it holds the pid) is known."""
    data = private_dir(tmp_path / "data")
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    temp = data / f".secret.{os.getpid()}.tmp"
    os.symlink(victim, temp)
    with pytest.raises(UnsafeFile, match="in the way"):
        load_or_create_secret(str(data))
    assert victim.read_bytes() == b"precious", "the symlink was followed"
    assert not (data / "secret").exists()
    # a dangling one: nothing is created where it points
    os.unlink(temp)
    target = tmp_path / "created-through-the-link"
    os.symlink(target, temp)
    with pytest.raises(UnsafeFile):
        load_or_create_secret(str(data))
    assert not target.exists() and not (data / "secret").exists()
    os.unlink(temp)
    secret = load_or_create_secret(str(data))      # once it is gone, a secret is made as usual
    assert len(secret) == SECRET_BYTES and mode(data / "secret") == 0o600


@pytest.mark.parametrize("target_mode", [0o600, 0o644])
def test_a_secret_that_is_a_symlink_is_refused(tmp_path, target_mode):
    data = private_dir(tmp_path / "data")
    elsewhere = secret_file(tmp_path / "elsewhere", file_mode=target_mode)
    os.symlink(elsewhere, data / "secret")
    refused(run_server("--data", str(data)), "symbolic link")
    with pytest.raises(UnsafeFile, match="symbolic link"):
        load_or_create_secret(str(data))
    # dangling: not created through it either
    os.unlink(data / "secret")
    os.symlink(tmp_path / "nowhere", data / "secret")
    refused(run_server("--data", str(data)), "symbolic link")
    assert not (tmp_path / "nowhere").exists()


def test_a_database_that_is_a_symlink_is_refused(tmp_path):
    data = private_dir(tmp_path / "data")
    secret_file(data / "secret")
    os.symlink(tmp_path / "other.db", data / "zim.db")
    refused(run_server("--data", str(data)), "database", "symbolic link")
    assert not (tmp_path / "other.db").exists()


# ------------------------------------------------------------------ owners


@pytest.mark.skipif(not is_root, reason="only root can give a file to another user")
def test_a_secret_owned_by_another_user_is_refused(tmp_path):
    data = private_dir(tmp_path / "data")
    secret = secret_file(data / "secret")
    os.chown(secret, 4321, 4321)
    refused(run_server("--data", str(data)), "uid 4321", "chown")


@pytest.mark.skipif(not is_root, reason="only root can give a file to another user")
def test_a_data_directory_or_database_owned_by_another_user_is_refused(tmp_path):
    data = private_dir(tmp_path / "data")
    os.chown(data, 4321, 4321)
    refused(run_server("--data", str(data)), "data directory", "uid 4321")
    os.chown(data, os.geteuid(), os.getegid())
    secret_file(data / "secret")
    (data / "zim.db").write_bytes(b"")
    os.chmod(data / "zim.db", 0o600)
    os.chown(data / "zim.db", 4321, 4321)
    refused(run_server("--data", str(data)), "database", "uid 4321")


# ------------------------------------------------------------------ --secret-file


def test_secret_file_replaces_the_data_directorys_secret(start_server, tmp_path):
    keys = private_dir(tmp_path / "keys")
    secret = secret_file(keys / "zim.key")
    data = tmp_path / "data"
    srv = start_server(flags=("--workers", "1", "--secret-file", str(secret)), data_dir=data)
    alice = srv.tcp_client()
    alice.login(unique("alice"))
    assert not (data / "secret").exists()
    srv.stop()
    # the same file, the same tokens
    again = start_server(flags=("--workers", "1", "--secret-file", str(secret)), data_dir=data)
    assert again.tcp_client().login(alice.name, token=alice.token)["id"] == alice.user_id


def test_a_loose_missing_or_linked_secret_file_is_refused(tmp_path):
    keys = private_dir(tmp_path / "keys")
    data = tmp_path / "data"
    loose = secret_file(keys / "loose", file_mode=0o644)
    refused(run_server("--data", str(data), "--secret-file", str(loose)), "secret file", "chmod 600")
    refused(run_server("--data", str(data), "--secret-file", str(keys / "missing")),
            "secret file", "does not exist")
    short = secret_file(keys / "short", b"x" * 31)
    refused(run_server("--data", str(data), "--secret-file", str(short)), "31 bytes")
    good = secret_file(keys / "good")
    os.symlink(good, keys / "link")
    refused(run_server("--data", str(data), "--secret-file", str(keys / "link")), "symbolic link")
    # a file in a directory others may write could be swapped: refused too
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    swapped = secret_file(shared / "secret")
    refused(run_server("--data", str(data), "--secret-file", str(swapped)), "chmod go-w")


@pytest.fixture(scope="module")
def redis_backend():
    yield from backend_fixture("redis")


@requires_redis_server
def test_nodes_take_the_secret_from_a_file_and_refuse_another(redis_backend, start_server, tmp_path):
    import redis

    keys = private_dir(tmp_path / "keys")
    secret = secret_file(keys / "zim.key")
    flags = ("--workers", "1", "--redis", redis_backend.url, "--secret-file", str(secret))
    a, b = start_server(flags=flags), start_server(flags=flags)
    alice = a.tcp_client()
    alice.login(unique("alice"))
    assert b.tcp_client().login(alice.name, token=alice.token)["id"] == alice.user_id
    assert "--secret-file" not in a.stderr(), "no fallback warning with a secret file"
    client = redis.Redis.from_url(redis_backend.url)
    try:
        assert client.get(schema.SECRET_KEY) is None, "the secret must not be in Redis"
        assert client.get(schema.SECRET_ID_KEY) is not None
    finally:
        client.close()
    # a node with another secret would issue tokens the others refuse: it does not start
    other = secret_file(keys / "other.key")
    refused(run_server("--redis", redis_backend.url, "--secret-file", str(other)), "differs")
    # nor does one on the Redis key (the fallback), which holds yet another secret
    refused(run_server("--redis", redis_backend.url), "differs")
    # the checks of a secret file hold on nodes too
    loose = secret_file(keys / "loose", file_mode=0o640)
    refused(run_server("--redis", redis_backend.url, "--secret-file", str(loose)), "chmod 600")


@requires_redis_server
def test_a_node_without_a_secret_file_says_why_it_should_have_one(start_server):
    from zim.testing.redis import LocalRedis

    service = LocalRedis().start()
    try:
        srv = start_server(flags=("--workers", "1", "--redis", service.url))
        srv.tcp_client().login(unique("u"))
        assert "--secret-file" in srv.stderr() and schema.SECRET_KEY in srv.stderr()
        srv.stop()
    finally:
        service.close()
