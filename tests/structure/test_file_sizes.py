"""No source file grows past about 700 lines: past that, a file holds more than one
concept and a reader cannot find one in it (issue 15: one home per concept)."""
from __future__ import annotations

from tests.support import REPO_ROOT

MAX_LINES = 700
SOURCE_SUFFIXES = {".py", ".pyx", ".pxd", ".pxi"}
FOLDERS = ("zim", "tests", "bench", "tools")


def source_files():
    for folder in FOLDERS:
        for path in sorted((REPO_ROOT / folder).rglob("*")):
            if path.suffix in SOURCE_SUFFIXES and path.is_file() and "build" not in path.parts:
                yield path
    for path in (REPO_ROOT / "tools").iterdir():
        if path.is_file() and not path.suffix and path.read_bytes().startswith(b"#!"):
            yield path          # launchers without a suffix


def test_no_source_file_is_over_700_lines():
    sizes = {path.relative_to(REPO_ROOT): len(path.read_text().splitlines()) for path in source_files()}
    assert len(sizes) > 50, "the walk found too few files: is REPO_ROOT right?"
    too_long = {str(path): lines for path, lines in sizes.items() if lines > MAX_LINES}
    assert not too_long, f"files over {MAX_LINES} lines (split them by concept): {too_long}"
