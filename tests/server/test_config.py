"""``zim-server --config FILE.toml``: settings from a TOML file, keys spelt as the flags.

Parsing is tested through ``zim.cli.parse_args`` (no server); refusals through the
real ``zim-server`` console script and ``python -m zim`` (exit status 2, the message
on stderr); the happy path and the precedence of a flag over the file by starting
real servers from a config file on free loopback ports.
"""
from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.support.servers import HOST, ServerProcess, free_port, stop_servers
from tests.support.client import unique

from zim import cli
from zim.config import ConfigError, config_keys, load_config
from zim.storage.retention import parse_tier

MIB = 1 << 20


def write(tmp_path: Path, text: str, name: str = "zim.toml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def refused(capsys, argv: list[str]) -> str:
    """parse_args(argv) must stop with status 2; its stderr."""
    with pytest.raises(SystemExit) as stop:
        cli.parse_args(argv)
    assert stop.value.code == 2
    return capsys.readouterr().err


# ------------------------------------------------------------------ parsing


def test_every_value_type(tmp_path):
    path = write(tmp_path, textwrap.dedent("""
        # strings, as on the command line
        tcp = "127.0.0.1:9000"
        ws = "off"
        data = "some/dir"
        max-outbuf = "8MiB"
        retain-private = "30d:1000"
        store = "memory"
        log-level = "DEBUG"
        # integers
        workers = 2
        max-packet = 100000
        push-window-ms = 50
        # floats
        channel-rate = 2.5
        user-rate = 0.5
        # booleans: on/off
        channel-push = false
        ws-deflate = true
    """))
    args = cli.parse_args(["--config", path])
    assert args.config == path
    assert (args.tcp, args.ws, args.data, args.store, args.log_level) == \
        ("127.0.0.1:9000", "off", "some/dir", "memory", "DEBUG")
    assert args.max_outbuf == 8 * MIB
    assert args.retain_private == parse_tier("30d:1000")
    assert (args.workers, args.max_packet, args.push_window_ms) == (2, 100000, 50)
    assert (args.channel_rate, args.user_rate) == (2.5, 0.5)
    assert (args.channel_push, args.ws_deflate) == ("off", "on")


def test_keys_not_in_the_file_keep_their_defaults(tmp_path):
    path = write(tmp_path, "workers = 1\n")
    from_file = vars(cli.parse_args(["--config", path]))
    defaults = vars(cli.parse_args([]))
    assert from_file.pop("workers") == 1 and from_file.pop("config") == path
    defaults.pop("workers"), defaults.pop("config")
    assert from_file == defaults


def test_an_empty_file_changes_nothing(tmp_path):
    path = write(tmp_path, "# nothing\n")
    assert {**vars(cli.parse_args(["--config", path])), "config": None} == vars(cli.parse_args([]))


def test_false_is_off_for_an_address(tmp_path):
    """A boolean is the text on/off, whatever the flag: --tcp takes 'off'."""
    args = cli.parse_args(["--config", write(tmp_path, "tcp = false\nws = \"127.0.0.1:9001\"\n")])
    assert (args.tcp, args.ws) == ("off", "127.0.0.1:9001")


@pytest.mark.parametrize("value, expected", [
    ('"8MiB"', 8 * MIB), ('"8M"', 8 * MIB), ('"8m"', 8 * MIB), ('"3072k"', 3 * MIB), ('"1GiB"', 1 << 30),
    ('"1g"', 1 << 30), ("8388608", 8 * MIB), ('"4194304"', 4 * MIB), ('" 16MiB "', 16 * MIB),
])
def test_size_units(tmp_path, value, expected):
    args = cli.parse_args(["--config", write(tmp_path, f"max-outbuf = {value}\n")])
    assert args.max_outbuf == expected


def test_a_flag_overrides_the_file(tmp_path):
    path = write(tmp_path, 'workers = 2\ntcp = "127.0.0.1:9000"\nchannel-push = false\nmax-outbuf = "8MiB"\n')
    args = cli.parse_args(["--workers", "3", "--config", path, "--max-outbuf", "16MiB"])
    assert (args.workers, args.max_outbuf) == (3, 16 * MIB)               # the flags, before or after --config
    assert (args.tcp, args.channel_push) == ("127.0.0.1:9000", "off")    # the file


def test_a_flag_equal_to_its_default_still_overrides_the_file(tmp_path):
    defaults = cli.parse_args([])
    path = write(tmp_path, 'max-packet = 100000\nchannel-push = false\ntcp = "127.0.0.1:9000"\n'
                           'retain-private = "1d:5"\n')
    args = cli.parse_args(["--config", path, "--max-packet", str(defaults.max_packet), "--channel-push", "on",
                           "--tcp", defaults.tcp, "--retain-private", str(defaults.retain_private)])
    assert (args.max_packet, args.channel_push, args.tcp, args.retain_private) == \
        (defaults.max_packet, "on", defaults.tcp, defaults.retain_private)


def test_the_outbuf_cross_check_sees_file_and_flags_together(tmp_path, capsys):
    path = write(tmp_path, 'max-outbuf = "2MiB"\n')
    err = refused(capsys, ["--config", path, "--max-packet", "2000000"])
    assert "zim-server: error: max_outbuf (2097152) must be at least twice max_packet" in err


def test_a_flag_added_later_is_covered_without_code(tmp_path, monkeypatch):
    """The keys come from the parser's actions: a new flag of any settable kind
    works in the file with its own type check, and flags of other kinds are refused."""
    build = cli.build_parser

    def extended() -> argparse.ArgumentParser:
        parser = build()
        parser.add_argument("--admin", type=cli._address, metavar="HOST:PORT")
        parser.add_argument("--trace", action="store_true")
        parser.add_argument("--quiet", action="store_false", dest="chatty")
        parser.add_argument("--color", action=argparse.BooleanOptionalAction, default=True)
        parser.add_argument("--peers", nargs="+", type=cli._address)
        parser.add_argument("--tag", action="append")
        return parser

    monkeypatch.setattr(cli, "build_parser", extended)
    path = write(tmp_path, 'admin = "127.0.0.1:9100"\ntrace = true\nquiet = true\ncolor = false\n'
                           'peers = ["10.0.0.1:1", "10.0.0.2:2"]\n')
    args = cli.parse_args(["--config", path])
    assert (args.admin, args.trace, args.chatty, args.color) == ("127.0.0.1:9100", True, False, False)
    assert args.peers == ["10.0.0.1:1", "10.0.0.2:2"]
    assert cli.parse_args(["--config", path, "--color"]).color is True     # the flag over the file's false

    parser = extended()
    settable, only_flags = config_keys(parser)
    assert {"admin", "trace", "quiet", "color", "peers", "workers", "max-outbuf"} <= set(settable)
    assert {"config", "help", "tag"} <= set(only_flags)
    assert "no-color" not in settable and "no-color" not in only_flags
    for text, says in [('admin = "127.0.0.1:notaport"', "admin: "),
                       ("trace = 1", "trace: expected true or false, not 1"),
                       ('peers = "10.0.0.1:1"', "peers: expected an array, not str"),
                       ('peers = []', "peers: expected at least one value"),
                       ('tag = "x"', "tag: --tag can only be given on the command line")]:
        with pytest.raises(ConfigError, match=says):
            load_config(write(tmp_path, text + "\n"), parser)


def test_dashes_only(tmp_path):
    parser = cli.build_parser()
    with pytest.raises(ConfigError, match=r"unknown key 'max_outbuf' \(did you mean 'max-outbuf'\?\)"):
        load_config(write(tmp_path, 'max_outbuf = "8MiB"\n'), parser)
    assert load_config(write(tmp_path, 'max-outbuf = "8MiB"\n'), parser) == {"max_outbuf": 8 * MIB}


# ---------------------------------------------------------------- refusals

BAD_FILES = [
    # (file text, what stderr must say after "zim-server: error: zim.toml: ")
    ('max-outbuf = "1k"\n', "max-outbuf: 1k is outside 2097152..1073741824 bytes"),
    ("max-outbuf = 1024\n", "max-outbuf: 1024 is outside 2097152..1073741824 bytes"),
    ('max-outbuf = "8MB!"\n', "max-outbuf: '8MB!' is not a size in bytes"),
    ("workers = 0\n", "workers: 0 is outside 1..64"),
    ("workers = 2.0\n", "workers: '2.0' is not an integer"),
    ("workers = true\n", "workers: true (read as 'on'): 'on' is not an integer"),
    ('tcp = "127.0.0.1:70000"\n', "tcp: "),
    ("channel-rate = inf\n", "channel-rate: "),
    ("channel-rate = -1\n", "channel-rate: "),
    ('channel-push = "maybe"\n', "channel-push: invalid choice: 'maybe' (choose from 'on', 'off')"),
    ('log-level = "debug"\n', "log-level: invalid choice: 'debug'"),
    ('retain-private = "30x:1"\n', "retain-private: "),
    ('max_outbuf = "8MiB"\n', "unknown key 'max_outbuf' (did you mean 'max-outbuf'?)"),
    ("wrokers = 2\n", "unknown key 'wrokers' (did you mean 'workers'?)"),
    ("colour = 1\n", "unknown key 'colour'"),
    ('[server]\ntcp = "127.0.0.1:9000"\n', "unknown table [server]: the keys go at the top level"),
    ("[tcp]\nport = 9000\n", "tcp: expected a string, integer, float or boolean, not a table"),
    ("tcp.port = 9000\n", "tcp: expected a string, integer, float or boolean, not a table"),
    ('tcp = { host = "127.0.0.1" }\n', "tcp: expected a string, integer, float or boolean, not a table"),
    ('tcp = ["127.0.0.1:9000"]\n', "tcp: expected a string, integer, float or boolean, not an array"),
    ("workers = 1979-05-27\n", "workers: expected a string, integer, float or boolean, not a date/time"),
    ('config = "other.toml"\n', "config: --config cannot be used inside a config file"),
    ("help = true\n", "help: --help can only be given on the command line"),
    ("workers = 1\nworkers = 2\n", "not valid TOML: Cannot overwrite a value (at line 2, column 12)"),
    ('workers = 1\ntcp = "127.0.0.1:9000\n', "not valid TOML: Illegal character '\\n' (at line 2, column 22)"),
    ("workers =\n", "not valid TOML: Invalid value (at line 1, column 10)"),
]


def run(command: list[str], tmp_path: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, timeout=30, cwd=tmp_path, env=env)


def assert_usage_error(result: subprocess.CompletedProcess, says: str) -> None:
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("usage: zim-server"), result.stderr
    assert f"zim-server: error: {says}" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr, result.stderr


@pytest.mark.parametrize("text, says", BAD_FILES, ids=[f"bad{i}" for i in range(len(BAD_FILES))])
def test_a_bad_file_is_refused_with_status_2(tmp_path, zim_env, text, says):
    (tmp_path / "zim.toml").write_text(text)
    data = tmp_path / "data"
    result = run([sys.executable, "-m", "zim", "--config", "zim.toml", "--data", str(data), "--tcp",
                  f"{HOST}:{free_port()}", "--ws", "off"], tmp_path, zim_env)
    assert_usage_error(result, f"zim.toml: {says}")
    assert not data.exists()                            # refused before anything started


def test_the_console_script_refuses_a_bad_value(tmp_path, zim_env):
    script = shutil.which("zim-server")
    if script is None:
        pytest.skip("the zim-server console script is not installed")
    (tmp_path / "zim.toml").write_text('workers = 1\nmax-outbuf = "1k"\n')
    result = run([script, "--config", "zim.toml", "--ws", "off"], tmp_path, zim_env)
    assert_usage_error(result, "zim.toml: max-outbuf: 1k is outside 2097152..1073741824 bytes")
    assert not (tmp_path / "zim-data").exists()


@pytest.mark.parametrize("name, says", [
    ("missing.toml", "missing.toml: cannot read it: No such file or directory"),
    (".", ".: cannot read it: Is a directory"),
])
def test_an_unreadable_file_is_refused(tmp_path, zim_env, name, says):
    result = run([sys.executable, "-m", "zim", "--config", name, "--ws", "off"], tmp_path, zim_env)
    assert_usage_error(result, says)
    assert not (tmp_path / "zim-data").exists()


def test_a_file_that_is_not_utf8_is_refused(tmp_path, capsys):
    path = tmp_path / "zim.toml"
    path.write_bytes(b'data = "\xff"\n')
    assert f"zim-server: error: {path}: not valid TOML: not UTF-8 text" in refused(capsys, ["--config", str(path)])


def test_the_first_bad_key_is_named(tmp_path, capsys):
    path = write(tmp_path, "workers = 1\nmax-packet = 7\nbogus = 1\n")
    err = refused(capsys, ["--config", path])
    assert err.endswith(f"zim-server: error: {path}: max-packet: 7 is outside 8..16777216\n"), err


def test_a_bad_flag_is_still_refused_with_a_good_file(tmp_path, capsys):
    path = write(tmp_path, "workers = 1\n")
    assert "argument --workers: 0 is outside 1..64" in refused(capsys, ["--config", path, "--workers", "0"])


def test_help_mentions_config(tmp_path, zim_env):
    result = run([sys.executable, "-m", "zim", "--help"], tmp_path, zim_env)
    assert result.returncode == 0
    assert "--config FILE" in result.stdout and "TOML" in result.stdout


# ------------------------------------------------------------ real servers


@pytest.fixture
def launch(tmp_path):
    """``launch(command, tcp_port, ws_port)``: a server started by hand (no flags added)
    in ``tmp_path``, ready; stopped and checked at the end."""
    started: list[ServerProcess] = []

    def make(command: list[str], tcp_port: int, ws_port: int) -> ServerProcess:
        srv = ServerProcess(command, tmp_path / "data", tcp_port, ws_port, tmp_path)
        started.append(srv)
        srv.wait_ready()
        return srv

    yield make
    stop_servers(started)


def two_ports() -> tuple[int, int]:
    first = free_port()
    second = free_port()
    while second == first:
        second = free_port()
    return first, second


def refuses(port: int) -> bool:
    try:
        socket.create_connection((HOST, port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False


def test_a_server_runs_from_a_config_file(launch, tmp_path):
    """zim-server --config alone: the ports, the data directory (relative to the
    current directory, like the flag) and channel-push = false all from the file."""
    script = shutil.which("zim-server")
    command = [script] if script else [sys.executable, "-m", "zim"]
    tcp_port, ws_port = two_ports()
    write(tmp_path, f'tcp = "{HOST}:{tcp_port}"\nws = "{HOST}:{ws_port}"\ndata = "data"\nworkers = 1\n'
                    f'max-outbuf = "8MiB"\nchannel-rate = 0\nchannel-push = false\n')
    srv = launch([*command, "--config", "zim.toml"], tcp_port, ws_port)
    alice = srv.tcp_client()
    alice.login(unique("alice"))
    bob = srv.ws_client()
    bob.login(unique("bob"))
    carol = srv.tcp_client()
    carol.login(unique("carol"))
    channel = unique("cfg")
    bob.ok(3, {"name": channel})                        # no "push" field: off, from the file
    carol.ok(3, {"name": channel, "push": True})
    alice.ok(3, {"name": channel})
    alice.ok(4, {"channel": channel, "content": "hello"})
    assert carol.recv_push()[1]["content"] == "hello"
    bob.assert_no_push()
    assert [m["content"] for m in bob.ok(5, {"channel": channel})["messages"]] == ["hello"]
    assert (tmp_path / "data" / "zim.db").exists()


def test_a_flag_overrides_the_file_on_a_real_server(launch, tmp_path):
    """The file says TCP port A, the flag port B: B is served and A is not; the
    file's WebSocket port is used."""
    file_port, flag_port = two_ports()
    ws_port = free_port()
    while ws_port in (file_port, flag_port):
        ws_port = free_port()
    path = write(tmp_path, f'tcp = "{HOST}:{file_port}"\nws = "{HOST}:{ws_port}"\n'
                           f'data = "{tmp_path / "data"}"\nworkers = 2\nstore = "memory"\n')
    srv = launch([sys.executable, "-m", "zim", "--config", path, "--tcp", f"{HOST}:{flag_port}",
                  "--workers", "1"], flag_port, ws_port)
    srv.tcp_client().login(unique("flag"))
    srv.ws_client().login(unique("file"))
    assert refuses(file_port)
    assert not (tmp_path / "data" / "zim.db").exists()  # store = "memory" from the file
