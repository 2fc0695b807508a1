"""The server options are defined once (zim.options) and every entry point agrees with it:
the command line, ``App.run``, README's flag table, the workers and the reactor."""
from __future__ import annotations

import inspect
import os
import re

import orjson
import pytest

from tests.support import REPO_ROOT
from zim import App, cli
from zim.limits import ClientLimits
from zim.options import BY_NAME, GROUPS, OPTIONS, Options
from zim.storage.retention import Retention
from zim.storage.store import Quotas
from zim.storage.writer import from_writer_settings, writer_settings

README = REPO_ROOT / "README.md"
COMMAND_LINE_ONLY = {"--config", "--log-level"}


def test_app_run_takes_every_option_with_the_tables_default():
    signature = inspect.signature(App.run).parameters
    groups = {"retention": Retention(), "client_limits": ClientLimits(), "quotas": Quotas()}
    for option in OPTIONS:
        if option.group is not None:
            default = getattr(signature[option.group].default, option.field or option.name)
            assert default == option.default, option.name
            assert default == getattr(groups[option.group], option.field or option.name), option.name
        elif option.name in signature:
            assert signature[option.name].default == option.default, option.name
    # the others (``store``, and an option added later) go by name through ``**more``
    assert any(parameter.kind is inspect.Parameter.VAR_KEYWORD for parameter in signature.values())
    assert set(GROUPS) <= set(signature)


def test_the_command_line_is_the_table_plus_its_own_flags():
    parser = cli.build_parser()
    flags = {action.option_strings[-1] for action in parser._actions if action.option_strings} - {"--help"}
    assert flags == {option.flag for option in OPTIONS} | COMMAND_LINE_ONLY
    defaults = cli.parse_args([])
    for option in OPTIONS:
        assert getattr(defaults, option.name) == option.flag_default_value(), option.name


def test_readme_lists_every_flag():
    listed = set(re.findall(r"^\| `(--[a-z-]+)", README.read_text(), re.MULTILINE))
    assert listed == {option.flag for option in OPTIONS} | COMMAND_LINE_ONLY


def test_the_command_line_and_app_run_make_the_same_options():
    from_flags = Options.from_flags(cli.parse_args(["--workers", "1"]))
    from_run = Options.from_run({})
    for option in OPTIONS:
        assert getattr(from_flags, option.name) == getattr(from_run, option.name), option.name
    assert from_flags.max_client_memory == from_run.max_client_memory and from_run.auto_client_memory


def test_workers_get_their_options_as_they_are():
    options = Options(tcp="127.0.0.1:9000", ws=None, max_outbuf=16 << 20, ws_origins="https://A.example:443",
                      max_client_memory=32 << 20, max_conns_per_address=7, workers=4)
    again = Options.from_json(options.worker_json())
    for option in OPTIONS:
        if option.worker:
            assert getattr(again, option.name) == getattr(options, option.name), option.name
    assert again.ws_origins == "https://a.example" and not again.auto_client_memory


def test_the_writer_gets_its_retention_and_quotas_as_they_are():
    options = Options.from_flags(cli.parse_args(["--retain-private", "0:5", "--retain-large", "12h:7", "--large-channel", "50",
                                                 "--prune-every", "3", "--max-mailbox", "9", "--max-mailbox-bytes", "4096"]))
    retention, quotas = from_writer_settings(orjson.loads(writer_settings(options.retention, options.quotas)))
    assert retention == options.retention and retention != Retention()
    assert (quotas.max_mailbox, quotas.max_mailbox_bytes) == (9, 4096)
    assert quotas.max_channels_per_user == 0        # the server checks that one, not the writer


def test_every_reactor_option_feeds_a_reactor_keyword():
    from zim._core import Reactor

    keywords = {option.reactor for option in OPTIONS if option.reactor}
    assert all(option.worker for option in OPTIONS if option.reactor)
    assert {"max_packet", "outbuf_limit", "login_timeout", "idle_timeout", "ws_deflate", "max_inflight",
            "memory_budget", "ws_origins", "max_conns_per_address", "tcp_deflate_min",
            "static_pages", "memory_release_interval"} == keywords
    reactor = Options(max_packet=100_000, max_outbuf=4 << 20).reactor(lambda *packet: None)
    assert isinstance(reactor, Reactor)
    reactor.close_all()


@pytest.mark.parametrize("values, says", [
    ({"max_outbuf": 1024}, "max_outbuf must be between"),
    ({"max_outbuf": 2 << 20, "max_packet": 2 << 20}, "must be at least twice max_packet"),
    ({"max_client_memory": 3 << 20}, "at least --max-outbuf"),
    ({"workers": 65}, "workers must be between 1 and 64"),
    ({"ws_deflate": "on"}, "ws_deflate must be True or False"),
    ({"tcp_deflate": "on"}, "tcp_deflate must be True or False"),
    ({"tcp_deflate_min": -1}, "tcp_deflate_min must be between 0 and"),
    ({"user_rate": -1}, "user_rate"),
    ({"max_conns_per_user": -1}, "max_conns_per_user"),
    ({"tcp": "127.0.0.1:0"}, "bad port"),
])
def test_a_bad_value_is_refused_by_name(values, says):
    with pytest.raises(ValueError, match=says):
        Options(**values)


def test_an_unknown_option_is_a_type_error():
    with pytest.raises(TypeError, match="max_outbuff"):
        Options(max_outbuff=1)
    assert set(BY_NAME) == {option.name for option in OPTIONS}


def test_the_workers_flag_defaults_to_the_cores():
    assert cli.parse_args([]).workers == (os.cpu_count() or 1)
