"""One client framing in the tree (issue 16): tests, benches and tools build and
parse zim's TCP packets and the WebSocket client frames with zim.client's codec
(``tcp_packet``, ``split_tcp``, ``ws_packet``, ``split_ws`` ..., and
``tcp_header``/``ws_header``/``ws_close_payload`` for the lying heads a test
sends on purpose), never with a struct format or byte arithmetic of their own.
"""
from __future__ import annotations

import re

from tests.structure.test_file_sizes import source_files
from tests.support import REPO_ROOT

# A struct format made of the client wire's fields, big-endian: the TCP head
# (">IHH", ">IhH"), a WebSocket message's head (">HH"), a close code (">H"), a
# frame's extended length (">H", ">Q", ">BBH", ">BBQ"), a packet length (">I").
WIRE_FORMAT = re.compile(r"""["'][>!](I[Hh][Hh]|[Hh][Hh]|H|I|Q|BB[HQ])["']""")
# The same fields cut out by hand: a 2- or 4-byte big-endian integer.
WIRE_BYTES = re.compile(r"""\.to_bytes\(\s*[24]\s*,\s*["']big["']|int\.from_bytes\([^\n]*["']big["']""")

# Files that frame something else than the client protocol, with why.
ELSEWHERE = {
    "zim/client": "the client codec itself",
    "zim/codec": "the server's codec (C)",
    "zim/_codec.pyx": "the server's codec (C)",
    "zim/workerlink.py": "the worker link's commands between a worker and its parent (internal)",
    "zim/nodes/fabric.py": "the heads of messages between nodes (internal)",
    "zim/storage/writer.py": "the storage link's answers, framed by the server's codec (internal)",
    "zim/storage/store.py": "the length of a name in the user table's heap (not a wire)",
    "zim/handler.py": "a push queued within a worker: action then body (not a wire)",
    "zim/server.py": "reads that queue back (not a wire)",
    "tests/structure/test_one_framing.py": "this check's own patterns and examples",
}


def _exempt(relative: str) -> bool:
    return any(relative == path or relative.startswith(path + "/") for path in ELSEWHERE)


def hand_framing(text: str) -> list[str]:
    """The lines of ``text`` that pack or parse the client wire by hand."""
    return [line.strip() for line in text.splitlines() if WIRE_FORMAT.search(line) or WIRE_BYTES.search(line)]


def test_the_exceptions_exist():
    missing = [path for path in ELSEWHERE if not (REPO_ROOT / path).exists()]
    assert not missing, f"ELSEWHERE lists what is gone: {missing}"


def test_no_framing_outside_zim_client():
    found = {}
    for path in source_files():
        relative = path.relative_to(REPO_ROOT).as_posix()
        if not _exempt(relative):
            lines = hand_framing(path.read_text(errors="replace"))
            if lines:
                found[relative] = lines
    assert not found, ("client framing by hand (use zim.client's codec: tcp_packet, split_tcp, "
                       f"ws_message, parse_ws_message, tcp_header, ws_header, ws_close_payload ...): {found}")


def test_the_patterns_catch_hand_framing():
    """The check itself: each way of framing by hand found before the change is caught."""
    caught = ['struct.pack(">IHH", 8, 9, 1)', "HEADER = struct.Struct('>IhH')", 'struct.unpack_from(">HH", p)',
              'struct.pack(">H", 1000) + b"bye"', 'struct.unpack_from(">I", buf)[0]',
              'struct.pack(">BBQ", b0, 255, n)', '(len(body) + 8).to_bytes(4, "big")',
              'int.from_bytes(answer[4:6], "big")']
    assert [line for line in caught if not hand_framing(line)] == []
    spared = ['struct.pack("ii", 1, 0)', 'struct.calcsize(">QQ")', 'struct.pack_into("=4Q", b, 0, *k)',
              'user.to_bytes(8, "big")', 'tcp_header(3, 1, 1)']
    assert [line for line in spared if hand_framing(line)] == []
