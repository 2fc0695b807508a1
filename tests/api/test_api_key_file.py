"""The server API's key file is checked before anything starts, as the other
secrets are: missing, loose, a symlink, too short, or --api without it, the
server refuses to start with a message that says what to do."""
from __future__ import annotations

import os

from tests.api.helpers import write_key_file
from tests.server.test_datadir import refused, run_server
from tests.support.servers import HOST, free_port


def api(key_file, *flags: str) -> tuple[str, ...]:
    return ("--store", "memory", "--api", f"{HOST}:{free_port()}", "--api-key-file", str(key_file), *flags)


def test_api_without_a_key_file_is_a_usage_error(tmp_path):
    result = run_server("--data", str(tmp_path / "data"), "--api", f"{HOST}:{free_port()}")
    assert result.returncode == 2 and "--api needs --api-key-file" in result.stderr, result.stderr


def test_a_bad_key_file_stops_the_start(tmp_path):
    data = ("--data", str(tmp_path / "data"))
    refused(run_server(*api(tmp_path / "missing", *data)), "API key file", "does not exist")
    loose = write_key_file(tmp_path)
    os.chmod(loose, 0o644)
    refused(run_server(*api(loose, *data)), "API key file", "chmod 600")
    link, target = tmp_path / "link", tmp_path / "target"
    target.mkdir()
    os.symlink(write_key_file(target, "x" * 32), link)
    refused(run_server(*api(link, *data)), "symbolic link")
    short = tmp_path / "short"
    short.write_text("too-short\n")
    short.chmod(0o600)
    refused(run_server(*api(short, *data)), "16 to 4096 bytes")
