"""Rules for display names (action 1) and channel names (action 3).

Display names are shown to other people, so the server refuses what lets one
name pass for another or mangle the text around it (docs/protocol.md, "Names"):

- normalised to NFC (``"e\\u0301"`` is stored as ``"\\u00e9"``), then stripped of
  leading and trailing whitespace;
- then at most ``MAX_NAME_CHARS`` characters (code points) and
  ``MAX_NAME_BYTES`` bytes of UTF-8;
- no control characters (Unicode category Cc: NUL, newlines, DEL ...), no line
  or paragraph separators (Zl, Zp), no format characters (Cf: the bidi
  overrides and isolates U+202A..U+202E and U+2066..U+2069, the marks U+200E,
  U+200F and U+061C, the zero-width space U+200B, the BOM, soft hyphens ...)
  except the zero-width joiner and non-joiner (U+200D, U+200C: emoji sequences,
  Indic and Persian text) and emoji tag sequences (subdivision flags), no
  surrogates (Cs), private-use (Co) or unassigned (Cn, in the server's
  ``unicodedata``) code points, except unassigned ones in the emoji blocks
  U+1F000..U+1FAFF;
- at least one visible character: not only whitespace, joiners, combining
  marks or blank letters such as U+3164 HANGUL FILLER.

Channel names are identifiers compared code point by code point: they are not
normalised, but a join (which creates channels) refuses the same invisible and
text-mangling characters (``check_channel_name``).
"""
from __future__ import annotations

import re
import unicodedata

MAX_NAME_CHARS = 64
MAX_NAME_BYTES = 256
MAX_CHANNEL_CHARS = 256    # an addition to docs/protocol.md: names are held per member
# what is read before normalising, to bound the work spent on a refused name: NFC
# composes at most 4 code points into one (U+1F8F is U+0391 U+0313 U+0342 U+0345),
# so nothing longer can come under MAX_NAME_CHARS
_MAX_INPUT_CHARS = 4 * MAX_NAME_CHARS

_ALLOWED_FORMAT = frozenset("\u200c\u200d")          # ZWNJ, ZWJ
_REFUSED_CATEGORIES = {
    "Cc": "control characters",
    "Cs": "surrogates",
    "Co": "private-use characters",
    "Cn": "unassigned code points",
    "Zl": "line separators",
    "Zp": "paragraph separators",
}
_BIDI = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u200e\u200f\u061c")
# U+1F3F4 WAVING BLACK FLAG, tag characters, CANCEL TAG: 🏴 England, Scotland, Wales ...
_EMOJI_TAG_SEQUENCE = re.compile("\U0001f3f4[\U000e0020-\U000e007e]+\U000e007f")
# emoji blocks: new emoji arrive there faster than Python's Unicode database (Python
# 3.11 has Unicode 14), so their unassigned code points are taken as emoji to come
_EMOJI_BLOCKS = range(0x1F000, 0x1FB00)
# letters and symbols that draw nothing
_BLANK = frozenset("\u115f\u1160\u3164\uffa0\u2800")


def _refused(text: str) -> str | None:
    """What is wrong with the characters of ``text`` (a reason), or None."""
    text = _EMOJI_TAG_SEQUENCE.sub("\U0001f3f4", text)
    for char in text:
        category = unicodedata.category(char)
        if category in _REFUSED_CATEGORIES and not (category == "Cn" and ord(char) in _EMOJI_BLOCKS):
            return f"must not contain {_REFUSED_CATEGORIES[category]} (U+{ord(char):04X})"
        if category == "Cf" and char not in _ALLOWED_FORMAT:
            what = "bidirectional controls" if char in _BIDI else "invisible format characters"
            return f"must not contain {what} (U+{ord(char):04X})"
    return None


def _visible(text: str) -> bool:
    for char in text:
        category = unicodedata.category(char)
        if (category[0] not in "ZMC" and char not in _BLANK) or (category == "Cn" and ord(char) in _EMOJI_BLOCKS):
            return True
    return False


def display_name(value: object, field: str = "name") -> str:
    """The display name to store for ``value``, or ValueError with the message
    to answer ``bad_request`` with."""
    if not isinstance(value, str) or not value:
        raise ValueError(f"{field} must be a non-empty string")
    if len(value) > _MAX_INPUT_CHARS:
        raise ValueError(f"{field} must be at most {MAX_NAME_CHARS} characters")
    name = unicodedata.normalize("NFC", value)
    reason = _refused(name)
    if reason is not None:
        raise ValueError(f"{field} {reason}")
    name = name.strip()
    if not _visible(name):
        raise ValueError(f"{field} must have a visible character (not only spaces or invisible characters)")
    if len(name) > MAX_NAME_CHARS:
        raise ValueError(f"{field} must be at most {MAX_NAME_CHARS} characters")
    if len(name.encode("utf-8")) > MAX_NAME_BYTES:
        raise ValueError(f"{field} must be at most {MAX_NAME_BYTES} bytes of UTF-8")
    return name


def check_channel_name(name: str, field: str = "name") -> str:
    """``name`` if a join may create a channel of that name, else ValueError."""
    reason = _refused(name)
    if reason is not None:
        raise ValueError(f"{field} {reason}")
    if not _visible(name):
        raise ValueError(f"{field} must have a visible character (not only spaces or invisible characters)")
    return name
