"""``zim-server --config FILE.toml``: flags from a TOML file.

The file's keys are the long flag names without their leading dashes, spelt
exactly as the flags are (``max-outbuf``, not ``max_outbuf``)::

    workers = 4
    tcp = "127.0.0.1:9000"
    max-outbuf = "8MiB"
    retain-private = "30d:1000"
    channel-push = false          # a boolean is on/off

Nothing here knows a particular flag: the keys and their checks come from the
parser's actions, so an option added to ``zim.options.OPTIONS`` (or a flag to
``zim.cli.build_parser``) can be set in the file too. A value is handed to the flag's own ``type=`` and ``choices`` as the
text it would have on the command line (strings as they are, integers and floats
in decimal, ``true``/``false`` as ``on``/``off``), so a value is accepted in the
file exactly when it is accepted as a flag.

Settable are the flags that store one value (``store``, ``store_true``/
``store_false``/``store_const``, ``BooleanOptionalAction``); a flag taking
several values (``nargs``) takes a TOML array. ``--config``, ``--help`` and flags
of other actions (``append``, ``count``, custom actions) are command-line only.

``load_config`` returns ``{dest: value}``; ``zim.cli.parse_args`` seeds the
namespace with it and parses the command line over it, so a default is
overridden by the file and the file by any flag actually given.
"""
from __future__ import annotations

import argparse
import datetime
import difflib
import sys
from typing import Any

CONFIG_KEY = "config"            # the --config flag: not settable from inside a file

_SCALAR_TYPES = (str, bool, int, float)
_SINGLE_NARGS = (None, argparse.OPTIONAL)
_SETTABLE = (argparse._StoreAction, argparse._StoreConstAction, argparse.BooleanOptionalAction)


class ConfigError(ValueError):
    """A config file that cannot be used; the message names the file (and the key)."""


def _long_names(action: argparse.Action) -> list[str]:
    names = [opt[2:] for opt in action.option_strings if opt.startswith("--") and len(opt) > 2]
    if isinstance(action, argparse.BooleanOptionalAction):
        names = [name for name in names if not name.startswith("no-")]
    return names


def config_keys(parser: argparse.ArgumentParser) -> tuple[dict[str, argparse.Action], dict[str, argparse.Action]]:
    """``(settable, command_line_only)``: the parser's long flags by key (the flag
    without ``--``), split into those a config file may set and the others."""
    settable: dict[str, argparse.Action] = {}
    only_flags: dict[str, argparse.Action] = {}
    for action in parser._actions:
        names = _long_names(action)
        usable = (isinstance(action, _SETTABLE) and action.dest not in (CONFIG_KEY, argparse.SUPPRESS)
                  and action.nargs != argparse.REMAINDER and action.nargs != argparse.PARSER)
        for name in names:
            (settable if usable and name != CONFIG_KEY else only_flags)[name] = action
    return settable, only_flags


def _toml_repr(raw: Any) -> str:
    if isinstance(raw, bool):
        return "true" if raw else "false"
    if isinstance(raw, str):
        return repr(raw)
    return str(raw)


def _what(raw: Any) -> str:
    if isinstance(raw, dict):
        return "a table"
    if isinstance(raw, list):
        return "an array"
    if isinstance(raw, (datetime.datetime, datetime.date, datetime.time)):
        return "a date/time"
    return type(raw).__name__


def _convert(action: argparse.Action, raw: Any, where: str) -> Any:
    """One scalar through the flag's ``type=`` and ``choices``, as argparse does with
    a command-line argument (the same messages, prefixed by file and key)."""
    if not isinstance(raw, _SCALAR_TYPES):
        raise ConfigError(f"{where}: expected a string, integer, float or boolean, not {_what(raw)}")
    if isinstance(raw, bool):
        text = "on" if raw else "off"
        shown = f"{_toml_repr(raw)} (read as {text!r})"
    else:
        text = raw if isinstance(raw, str) else str(raw)
        shown = None
    try:
        value = action.type(text) if action.type is not None else text
    except argparse.ArgumentTypeError as exc:
        message = str(exc)
    except (TypeError, ValueError):
        name = getattr(action.type, "__name__", repr(action.type))
        message = f"invalid {name} value: {text!r}"
    else:
        if action.choices is None or value in action.choices:
            return value
        choices = ", ".join(map(repr, action.choices))
        message = f"invalid choice: {value!r} (choose from {choices})"
    raise ConfigError(f"{where}: {shown}: {message}" if shown else f"{where}: {message}")


def _value(action: argparse.Action, raw: Any, where: str) -> Any:
    if action.nargs == 0:                           # a switch: store_true/false/const, --x/--no-x
        if not isinstance(raw, bool):
            shown = _toml_repr(raw) if isinstance(raw, _SCALAR_TYPES) else _what(raw)
            raise ConfigError(f"{where}: expected true or false, not {shown}")
        if isinstance(action, argparse.BooleanOptionalAction):
            return raw
        return action.const if raw else action.default
    if action.nargs in _SINGLE_NARGS:
        return _convert(action, raw, where)
    if not isinstance(raw, list):                  # nargs "*", "+" or N: an array
        raise ConfigError(f"{where}: expected an array, not {_what(raw)}")
    if action.nargs == argparse.ONE_OR_MORE and not raw:
        raise ConfigError(f"{where}: expected at least one value")
    if isinstance(action.nargs, int) and len(raw) != action.nargs:
        raise ConfigError(f"{where}: expected {action.nargs} values, not {len(raw)}")
    return [_convert(action, item, f"{where}[{i}]") for i, item in enumerate(raw)]


def _unknown(key: str, raw: Any, known: list[str], path: str) -> ConfigError:
    if isinstance(raw, dict):
        return ConfigError(f"{path}: unknown table [{key}]: the keys go at the top level of the file, "
                           f"not in a table")
    spelled = key.replace("_", "-")
    match = [spelled] if spelled in known else difflib.get_close_matches(key, known, n=1)
    hint = f" (did you mean '{match[0]}'?)" if match else ""
    return ConfigError(f"{path}: unknown key '{key}'{hint}")


def read_toml(path: str) -> dict[str, Any]:
    """The file's TOML document; ConfigError if it cannot be read or parsed."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:                                           # pragma: no cover - Python 3.10
        try:
            import tomli as tomllib
        except ModuleNotFoundError:
            raise ConfigError(f"{path}: reading a config file on Python 3.10 needs the tomli "
                              f"package (pip install tomli)") from None
    try:
        with open(path, "rb") as file:
            return tomllib.load(file)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read it: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def load_config(path: str, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """``{dest: value}`` for the flags the TOML file at ``path`` sets, every value
    checked by its flag's own type and choices. ConfigError (the message starting
    with the path) for an unreadable or invalid file, an unknown key (with the
    closest known one), a command-line-only flag, or a bad value."""
    document = read_toml(path)
    settable, only_flags = config_keys(parser)
    known = sorted(settable)
    values: dict[str, Any] = {}
    given_as: dict[str, str] = {}
    for key, raw in document.items():
        if key == CONFIG_KEY:
            raise ConfigError(f"{path}: {key}: --config cannot be used inside a config file")
        if key in only_flags:
            raise ConfigError(f"{path}: {key}: --{key} can only be given on the command line")
        action = settable.get(key)
        if action is None:
            raise _unknown(key, raw, known, path)
        if action.dest in given_as:
            raise ConfigError(f"{path}: {key}: the same setting as {given_as[action.dest]}, given twice")
        values[action.dest] = _value(action, raw, f"{path}: {key}")
        given_as[action.dest] = key
    return values
