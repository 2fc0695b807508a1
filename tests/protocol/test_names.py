"""Display names (action 1) and channel names (action 3) against real servers, on 1 and 3
workers, TCP and WebSocket: names are NFC-normalised and stripped, bounded after that,
and refused (``bad_request``) with controls, bidi overrides, other invisible format
characters, or nothing visible; emoji with joiners pass. The same rules apply to a
rename through a token login. Joins refuse channel names with those characters."""
from __future__ import annotations

import unicodedata

import pytest

from tests.support.client import unique

FAMILY = "\U0001f468\u200d\U0001f469\u200d\U0001f467\u200d\U0001f466"      # man ZWJ woman ZWJ girl ZWJ boy
RAINBOW_FLAG = "\U0001f3f3\ufe0f\u200d\U0001f308"
ENGLAND = "\U0001f3f4\U000e0067\U000e0062\U000e0065\U000e006e\U000e0067\U000e007f"   # a tag sequence

BAD_NAMES = {
    "nul": "ali\x00ce",
    "newline": "alice\nbob",
    "del": "alice\x7f",
    "c1-control": "alice\x85",
    "rlo": "alice\u202egnp.exe",
    "lro": "\u202dalice",
    "rli-isolate": "alice\u2067x",
    "rlm": "alice\u200f",
    "arabic-letter-mark": "alice\u061c",
    "zero-width-space": "ali\u200bce",
    "bom": "\ufeffalice",
    "soft-hyphen": "ali\u00adce",
    "stray-tag": "alice\U000e0041",
    "line-separator": "alice\u2028bob",
    "private-use": "alice\ue000",
    "unassigned": "alice\u0378",
    "only-spaces": "     ",
    "only-tab": "\t",
    "only-ideographic-spaces": "\u3000\u3000",
    "only-nbsp-and-zwj": "\u00a0\u200d\u00a0",
    "only-combining-marks": "\u0301\u0302",
    "hangul-filler": "\u3164",
    "over-long-after-nfc": "\ufb2c" * 22,        # 22 characters sent, 66 once normalised by NFC
}


@pytest.mark.parametrize("name", list(BAD_NAMES.values()), ids=list(BAD_NAMES))
def test_a_bad_display_name_is_bad_request(connect, name):
    client = connect()
    result = client.call(1, {"name": name})
    assert result["error"]["code"] == "bad_request", result
    assert "name must" in result["error"]["message"], result
    assert client.error(2, {"receiverId": "1", "content": "x"}) == "not_logged_in"
    client.login(unique("after"))                       # the connection stays usable


def test_a_rename_through_a_token_login_follows_the_same_rules(connect):
    first = connect()
    first.login(unique("carol"))
    peer = connect()
    peer.login(unique("peer"))
    again = connect()
    for bad in (BAD_NAMES["nul"], BAD_NAMES["rlo"], BAD_NAMES["only-spaces"], BAD_NAMES["over-long-after-nfc"]):
        assert again.error(1, {"name": bad, "token": first.token}) == "bad_request"
    renamed = "  Ame\u0301lie  "                        # NFD, padded: stored as NFC, stripped
    assert again.login(renamed, first.token)["id"] == first.user_id
    again.ok(2, {"receiverId": peer.user_id, "content": "renamed"})
    _, push = peer.recv_push()
    assert push["sender"] == {"id": first.user_id, "name": "Am\u00e9lie"}, push


def test_an_nfd_name_is_stored_and_pushed_as_nfc(connect):
    nfd = unicodedata.normalize("NFD", "Zoë Ångström " + unique("n"))
    nfc = unicodedata.normalize("NFC", nfd)
    assert nfd != nfc
    alice, bob = connect(), connect()
    alice.login(nfd)
    bob.login(unique("bob"))
    alice.ok(2, {"receiverId": bob.user_id, "content": "hej"})
    _, push = bob.recv_push()
    assert push["sender"]["name"] == nfc, push
    page = bob.ok(5, {"userId": alice.user_id})
    assert [m["sender"]["name"] for m in page["messages"]] == [nfc]


def test_names_are_stripped_and_bounded_after_normalising(connect):
    receiver = connect()
    receiver.login(unique("receiver"))
    expected = {
        " \u3000padded\u00a0 ": "padded",
        "e\u0301" * 64: "\u00e9" * 64,                  # 128 code points sent, 64 stored
        "\U0001f600" * 64: "\U0001f600" * 64,           # 64 characters, 256 bytes: the bounds
    }
    for sent, stored in expected.items():
        sender = connect()
        sender.login(sent)
        sender.ok(2, {"receiverId": receiver.user_id, "content": "x"})
        _, push = receiver.recv_push()
        assert push["sender"]["name"] == stored, (sent, push)


def test_emoji_with_joiners_pass_and_other_zero_width_characters_do_not(connect):
    receiver = connect()
    receiver.login(unique("receiver"))
    persian = "\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645"           # with a zero-width non-joiner
    for name in (FAMILY, RAINBOW_FLAG, ENGLAND, f"dev {FAMILY} team", persian):
        sender = connect()
        sender.login(name)
        sender.ok(2, {"receiverId": receiver.user_id, "content": "x"})
        _, push = receiver.recv_push()
        assert push["sender"]["name"] == name
    for invisible in ("\u200b", "\u2060", "\u180e", "\u2062"):      # ZWSP, word joiner, MVS, invisible times
        assert connect().error(1, {"name": f"team{invisible}{FAMILY}"}) == "bad_request"


BAD_CHANNELS = {
    "nul": "room\x00",
    "rlo": "room\u202e1",
    "zero-width-space": "ro\u200bom",
    "only-spaces": "   ",
    "newline": "room\n",
}


@pytest.mark.parametrize("channel", list(BAD_CHANNELS.values()), ids=list(BAD_CHANNELS))
def test_a_join_refuses_channel_names_with_controls_bidi_or_nothing_visible(connect, channel):
    client = connect()
    client.login(unique("joiner"))
    result = client.call(3, {"name": channel})
    assert result["error"]["code"] == "bad_request" and "name must" in result["error"]["message"], result
    assert client.error(6, {"name": channel}) == "not_found"    # never created
    emoji_room = unique("room") + " " + FAMILY
    assert client.ok(3, {"name": emoji_room}) == {}
    client.ok(4, {"channel": emoji_room, "content": "still fine"})
