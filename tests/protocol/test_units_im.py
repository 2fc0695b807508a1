"""Unit tests of the pure-Python parts of the IM: ids, tokens, the memory store,
and the page-size cut. No server, no sockets."""
from __future__ import annotations

import os
import stat
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zim.ids import EPOCH_MS, MAX_SEQUENCE, Snowflake, timestamp_ms
from zim.names import MAX_CHANNEL_CHARS
from zim.storage.store import MAX_USER_ID, MemoryStore, UserNames, page
from zim.tokens import SECRET_BYTES, Claims, load_or_create_secret, make_token, parse_user_id, verify_token

SECRET = bytes(range(32))
OTHER_SECRET = bytes(range(1, 33))
NOW = EPOCH_MS + 10_000_000_000     # some time in 2024


class FakeClock:
    """A clock that returns what the test sets, in Unix ms."""

    def __init__(self, now: int = NOW) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now


# ------------------------------------------------------------------ ids


def test_snowflake_layout_and_timestamp():
    clock = FakeClock()
    ids = Snowflake(worker_id=5, clock=clock)
    first = ids.next()
    assert timestamp_ms(first) == NOW
    assert (first >> 12) & 0x3FF == 5
    assert first & 0xFFF == 0
    assert 0 < first < 1 << 63
    assert ids.next() == first + 1          # same ms: the sequence counts up


def test_snowflake_real_clock_near_now():
    import time
    made = Snowflake().next()
    assert abs(timestamp_ms(made) - time.time() * 1000) < 5_000


@pytest.mark.parametrize("worker", [-1, 1024, 1.5, "1"])
def test_snowflake_rejects_bad_worker(worker):
    with pytest.raises(ValueError):
        Snowflake(worker_id=worker)


def test_snowflake_clock_step_back_stays_monotonic():
    clock = FakeClock()
    ids = Snowflake(clock=clock)
    before = [ids.next() for _ in range(3)]
    clock.now -= 60_000                     # NTP steps the clock back a minute
    after = [ids.next() for _ in range(3)]
    assert before + after == sorted(set(before + after))
    assert all(timestamp_ms(i) == NOW for i in after), "ids keep the last ms, not the stepped-back one"
    clock.now = NOW + 1
    assert timestamp_ms(ids.next()) == NOW + 1


def test_snowflake_sequence_overflow_borrows_next_ms():
    clock = FakeClock()
    ids = Snowflake(clock=clock)
    made = [ids.next() for _ in range(MAX_SEQUENCE + 1 + 10)]   # frozen clock
    assert made == sorted(set(made))
    assert timestamp_ms(made[MAX_SEQUENCE]) == NOW
    assert timestamp_ms(made[MAX_SEQUENCE + 1]) == NOW + 1
    assert made[MAX_SEQUENCE + 1] & 0xFFF == 0
    clock.now = NOW + 1                    # the clock catches up: still no duplicate
    later = ids.next()
    assert later > made[-1]


def test_snowflake_clock_before_epoch_gives_positive_ids():
    ids = Snowflake(clock=FakeClock(EPOCH_MS - 5))
    made = [ids.next() for _ in range(5)]
    assert all(i > 0 for i in made) and made == sorted(set(made))


def test_snowflake_advance_past():
    clock = FakeClock()
    ids = Snowflake(clock=clock)
    newest_on_disk = Snowflake(worker_id=1023, clock=FakeClock(NOW + 50_000)).next()
    ids.advance_past(newest_on_disk)
    assert ids.next() > newest_on_disk
    older = Snowflake(clock=FakeClock(NOW - 5)).next()
    last = ids.next()
    ids.advance_past(older)                 # never moves backwards
    assert ids.next() > last


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=-5_000, max_value=5_000), min_size=1, max_size=300),
       st.integers(min_value=0, max_value=1023))
def test_snowflake_monotonic_under_any_clock(steps, worker):
    clock = FakeClock()
    ids = Snowflake(worker_id=worker, clock=clock)
    previous = 0
    for step in steps:
        clock.now += step
        made = ids.next()
        assert made > previous
        assert (made >> 12) & 0x3FF == worker
        previous = made


# ------------------------------------------------------------------ tokens


# Tokens carry an epoch and an expiry since version 2 (zim.tokens; the lifetime
# and revocation tests are in test_tokens_lifetime.py).
EXPIRES = NOW + 86_400_000


def test_token_round_trip():
    for user_id in (1, 12345, 7259483021034782720, (1 << 64) - 1):
        token = make_token(SECRET, user_id, 3, EXPIRES)
        assert token.startswith(f"v2.{user_id}.3.{EXPIRES}.")
        assert verify_token(SECRET, token) == Claims(user_id, 3, EXPIRES, 2)
        assert token.isascii() and "=" not in token
        assert make_token(SECRET, user_id, 3, EXPIRES) == token     # deterministic, nothing stored


def test_token_other_secret_or_other_user_rejected():
    token = make_token(SECRET, 42, 0, EXPIRES)
    assert verify_token(OTHER_SECRET, token) is None
    signature = token.rsplit(".", 1)[1]
    assert verify_token(SECRET, f"v2.43.0.{EXPIRES}.{signature}") is None


@pytest.mark.parametrize("user_id", [0, -1, 1 << 64])
def test_make_token_rejects_out_of_range_ids(user_id):
    with pytest.raises(ValueError):
        make_token(SECRET, user_id, 0, EXPIRES)


def _forgeries(token: str) -> list:
    _, user_text, epoch, expires, signature = token.split(".")
    head = f"v2.{user_text}.{epoch}.{expires}"
    return [
        "", ".", "42", "42.", f".{signature}", token + "x", token[:-1], token[::-1],
        "0." + token, token + "==", f"v2.042.{epoch}.{expires}.{signature}", f"v2.+42.{epoch}.{expires}.{signature}",
        f"v2. 42.{epoch}.{expires}.{signature}", f"{head} .{signature}", f"{head}.{signature} ",
        f"v2.٤٢.{epoch}.{expires}.{signature}", f"{head}.{signature.upper()}",
        f"{head}.{signature[:-1]}{'A' if signature[-1] != 'A' else 'B'}", "x" * 10_000,
        f"v2.{'9' * 30}.{epoch}.{expires}.{signature}", f"v2.42.00.{expires}.{signature}",
        f"v2.42.{epoch}.0{expires}.{signature}", f"V2.42.{epoch}.{expires}.{signature}",
        f"v1.42.{epoch}.{expires}.{signature}", f"42.{signature}", f"{head}.\udcff", "😀.😀", "\x00",
        None, 42, b"42.abc", ["42", signature], {"token": token}, 4.2,
    ]


def test_token_forgeries_and_garbage_rejected():
    token = make_token(SECRET, 42, 0, EXPIRES)
    for forged in _forgeries(token):
        assert verify_token(SECRET, forged) is None, forged


@settings(max_examples=500, deadline=None)
@given(st.one_of(st.text(max_size=80), st.binary(max_size=40), st.integers(), st.none(),
                 st.lists(st.text(max_size=5), max_size=3)))
def test_verify_token_never_raises(garbage):
    assert verify_token(SECRET, garbage) is None


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=1, max_value=(1 << 64) - 1), st.integers(min_value=0, max_value=21),
       st.characters(codec="ascii"))
def test_one_changed_character_breaks_a_token(user_id, position, replacement):
    token = make_token(SECRET, user_id, 0, EXPIRES)
    signature_start = token.rindex(".") + 1
    index = signature_start + position
    if token[index] == replacement:
        return
    forged = token[:index] + replacement + token[index + 1:]
    assert verify_token(SECRET, forged) is None


@pytest.mark.parametrize("text,expected", [
    ("1", 1), ("18446744073709551615", (1 << 64) - 1), ("18446744073709551616", None), ("0", None),
    ("01", None), ("-5", None), (" 1", None), ("1.5", None), ("", None), ("٣", None), ("abc", None),
    ("1" * 40, None), (5, None), (None, None),
])
def test_parse_user_id(text, expected):
    assert parse_user_id(text) == expected


def test_secret_created_once_with_mode_0600(tmp_path):
    secret = load_or_create_secret(str(tmp_path))
    assert isinstance(secret, bytes) and len(secret) == SECRET_BYTES
    path = tmp_path / "secret"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_or_create_secret(str(tmp_path)) == secret        # reused, not remade
    assert [p.name for p in tmp_path.iterdir()] == ["secret"], "temporary file left behind"
    other = tmp_path / "other"
    other.mkdir()
    assert load_or_create_secret(str(other)) != secret


def test_secret_creation_ignores_umask(tmp_path):
    old = os.umask(0)
    try:
        load_or_create_secret(str(tmp_path))
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "secret").stat().st_mode) == 0o600


@pytest.mark.parametrize("content", [b"", b"short", b"x" * 31, b"x" * 33, b"x" * 4096])
def test_secret_of_wrong_size_is_an_error(tmp_path, content):
    (tmp_path / "secret").write_bytes(content)
    with pytest.raises(RuntimeError, match="secret"):
        load_or_create_secret(str(tmp_path))
    assert (tmp_path / "secret").read_bytes() == content, "an existing secret must never be replaced"


def test_secret_unreadable_is_an_error(tmp_path):
    (tmp_path / "secret").mkdir()          # a directory where the file should be
    with pytest.raises(RuntimeError, match="secret"):
        load_or_create_secret(str(tmp_path))


@pytest.mark.skipif(sys.platform != "linux" or os.geteuid() == 0, reason="root reads mode 000 files")
def test_secret_without_permission_is_an_error(tmp_path):
    path = tmp_path / "secret"
    path.write_bytes(b"x" * 32)
    path.chmod(0)
    with pytest.raises(RuntimeError, match="secret"):
        load_or_create_secret(str(tmp_path))


# ------------------------------------------------------------------ store
# (the behaviour shared by every Store is tested on each in tests/storage/test_storage_sqlite.py)


def message(text: str, message_id: int) -> dict:
    return {"id": str(message_id), "seq": 0, "content": text,
            "sender": {"id": "1", "name": "a"}, "createdAt": 0}


@settings(max_examples=300, deadline=None)
@given(st.integers(min_value=0, max_value=60), st.one_of(st.none(), st.integers(min_value=-3, max_value=70)),
       st.integers(min_value=1, max_value=100))
def test_page_matches_definition(count, before, limit):
    log = [{"seq": n} for n in range(1, count + 1)]
    got, has_more = page(log, before, limit)
    eligible = [m["seq"] for m in log if before is None or m["seq"] < before]
    expected = eligible[-limit:] if eligible else []
    assert [m["seq"] for m in got] == expected
    assert has_more == (bool(expected) and expected[0] > 1)


def test_idle_user_costs_no_python_objects():
    """A user that has only logged in (and pulled an empty mailbox) is an id and a name
    in UserNames: tens of bytes, no dict entry, list or object of its own."""
    import tracemalloc

    store = MemoryStore()
    ids = Snowflake()
    count = 20_000
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for index in range(count):
            user_id = ids.next()
            store.create_user(user_id, f"user{index:06d}")
            assert store.user_channels(user_id) == [] and store.mailbox_pull(user_id, 100) == []
            store.mailbox_ack(user_id, ["x"])
            store.set_user_name(user_id, f"user{index:06d}")      # a login with a token, same name
        per_user = (tracemalloc.get_traced_memory()[0] - before) / count
    finally:
        tracemalloc.stop()
    assert per_user < 48, f"{per_user:.1f} bytes per idle user"
    containers = [value for value in vars(store).values() if isinstance(value, dict)]
    assert sum(len(c) for c in containers) == 0


def test_user_names_out_of_order_ids_and_renames():
    names = UserNames()
    names.add(50, "fifty")
    names.add(10, "ten")                                    # older id: inserted in place
    names.add(30, "")
    names.add(MAX_USER_ID, "max")
    assert len(names) == 4
    assert [names.get(i) for i in (10, 30, 50, MAX_USER_ID)] == [b"ten", b"", b"fifty", b"max"]
    assert names.get(20) is None and 20 not in names and "10" not in names
    for bad in (0, -1, MAX_USER_ID + 1, 10, 50):
        with pytest.raises(ValueError):
            names.add(bad, "x")
    names.rename(10, "TEN")
    assert names.get(10) == b"TEN"
    names.rename(10, "ten")                                 # back to the original: no dict entry
    assert names.get(10) == b"ten" and not names._renamed
    with pytest.raises(KeyError):
        names.rename(11, "x")
    with pytest.raises(ValueError):
        names.add(60, "x" * 70_000)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["add", "rename"]), st.integers(min_value=1, max_value=40),
                          st.text(max_size=8)), max_size=80))
def test_user_names_behave_like_a_dict(operations):
    names, model = UserNames(), {}
    for operation, user_id, name in operations:
        if operation == "add":
            if user_id in model:
                with pytest.raises(ValueError):
                    names.add(user_id, name)
            else:
                names.add(user_id, name)
                model[user_id] = name
        elif user_id in model:
            names.rename(user_id, name)
            model[user_id] = name
        else:
            with pytest.raises(KeyError):
                names.rename(user_id, name)
    assert len(names) == len(model)
    for user_id in range(0, 42):
        expected = model.get(user_id)
        assert names.get(user_id) == (None if expected is None else expected.encode())
        assert (user_id in names) == (user_id in model)


# ------------------------------------------------------------------ page cut


def test_page_cut_under_budget():
    from zim import im

    small = [message("x" * 10, i) for i in range(100)]
    assert im.newest_that_fit(small) == (small, False)
    assert im.oldest_that_fit(small) == small
    big = [message(f"{i:03d}" + "x" * 60_000, i) for i in range(24)]
    newest, cut = im.newest_that_fit(big)
    assert cut and 0 < len(newest) < 24 and newest == big[24 - len(newest):]
    oldest = im.oldest_that_fit(big)
    assert 0 < len(oldest) < 24 and oldest == big[:len(oldest)]
    import orjson
    for chosen in (newest, oldest):
        assert len(orjson.dumps({"messages": chosen, "hasMore": True})) <= im.RESPONSE_BUDGET
    # escaped control characters take 6 bytes each: measured, not guessed
    escaped = [message("\x01" * 30_000, i) for i in range(10)]
    newest, cut = im.newest_that_fit(escaped)
    assert cut and len(orjson.dumps({"messages": newest, "hasMore": True})) <= im.RESPONSE_BUDGET
    # one message larger than the budget is still returned, so paging makes progress
    huge = [message("y" * 1_200_000, 1), message("z" * 1_200_000, 2)]
    assert im.newest_that_fit(huge) == ([huge[1]], True)
    assert im.oldest_that_fit(huge) == [huge[0]]
    assert im.newest_that_fit([]) == ([], False)


# ------------------------------------------------------------------ validation helpers


def _bad(call) -> str:
    from zim.app import Error

    with pytest.raises(Error) as caught:
        call()
    assert caught.value.code == "bad_request"
    return caught.value.message


def test_required_str_and_channel_name():
    from zim import im

    assert im.required_str({"name": "x"}, "name") == "x"
    for body in ({}, {"name": ""}, {"name": None}, {"name": 5}, {"name": ["x"]}, {"name": True}):
        assert _bad(lambda: im.required_str(body, "name")) == "name must be a non-empty string"
    assert im.required_str({"name": "é" * 64}, "name", 64) == "é" * 64
    assert "at most 64" in _bad(lambda: im.required_str({"name": "é" * 65}, "name", 64))
    assert im.channel_name({"channel": "c" * MAX_CHANNEL_CHARS}, "channel")
    _bad(lambda: im.channel_name({"channel": "c" * (MAX_CHANNEL_CHARS + 1)}, "channel"))


def test_optional_fields():
    from zim import im

    assert im.optional_str({}, "token") is None and im.optional_str({"token": ""}, "token") == ""
    for value in (None, 5, ["t"], {"t": 1}):
        _bad(lambda: im.optional_str({"token": value}, "token"))
    assert im.optional_bool({}, "push", True) is True
    assert im.optional_bool({"push": False}, "push", True) is False
    for value in (None, 0, 1, "yes"):
        _bad(lambda: im.optional_bool({"push": value}, "push", True))
    assert im.optional_int({}, "beforeSeq") is None
    assert im.optional_int({"beforeSeq": -3}, "beforeSeq") == -3
    for value in (None, True, False, 1.5, 5.0, "3", [1], float("nan"), float("inf")):
        _bad(lambda: im.optional_int({"beforeSeq": value}, "beforeSeq"))
    # JSON integers beyond 64 bits, which orjson hands over as floats
    import orjson
    body = orjson.loads(b'{"a": 100000000000000000000000000000, "b": -9223372036854775809}')
    assert im.optional_int(body, "a") == int(1e29) and im.optional_int(body, "b") == -(2**63)


def test_limit_and_lists():
    from zim import im

    assert im.limit_param({}, 20) == 20
    assert im.limit_param({"limit": 1}, 20) == 1
    assert im.limit_param({"limit": 101}, 20) == 100
    assert im.limit_param({"limit": 2**64 - 1}, 20) == 100
    assert im.limit_param({"limit": 1e30}, 20) == 100
    for value in (0, -1, -1e30, True, 1.5, None, "5"):
        _bad(lambda: im.limit_param({"limit": value}, 20))
    assert im.str_list({"ids": []}, "ids") == []
    assert im.str_list({"ids": ["1", ""]}, "ids") == ["1", ""]
    for value in (None, "1", [1], [None], {"a": "b"}, ["1", 2]):
        _bad(lambda: im.str_list({"ids": value}, "ids"))


def test_page_cut_measures_messages_of_any_shape():
    """Custom handlers may store messages without a sender or with odd fields: the
    page-size check measures them instead of failing."""
    from zim.im import newest_that_fit, oldest_that_fit

    odd = [{"content": "x"}, {"content": 5, "sender": None}, {"id": "1"}]
    assert newest_that_fit(odd) == (odd, False)
    assert oldest_that_fit(odd) == odd
    big = [{"content": "y" * 400_000} for _ in range(3)]
    kept, cut = newest_that_fit(big)
    assert cut and kept == big[1:]


def test_retention_flags_parse_and_print():
    from zim.storage.retention import DAY_MS, Retention, Tier, parse_duration, parse_tier

    assert parse_duration("90") == 90_000 and parse_duration("15m") == 900_000
    assert parse_duration("500ms") == 500 and parse_duration("0") == 0
    assert parse_tier("30d:10000") == Tier(30 * DAY_MS, 10_000)
    assert str(Tier(2_000, 0)) == "2s:0" and str(Tier(0, 5)) == "0:5"
    for bad in ("30", "3x:1", "1d:-1", "1d:", ":5", "200y:1", "1e3:1"):
        with pytest.raises(ValueError):
            parse_tier(bad)
    defaults = Retention()
    assert parse_tier(str(defaults.private)) == defaults.private
    assert defaults.tier(True, 999) == defaults.channel and defaults.tier(True, 1000) == defaults.large
    assert defaults.tier(False, 10**6) == defaults.private
