"""The official `wrenn` 0.3.0 SDK, unmodified, in a venv of its own (made once, cached in
`.cache/`), against the whole Nestbox stack: lifecycle, commands (foreground, streamed,
background, kill), files, PTY, pause/resume, snapshot and a capsule from it (`wrenn_script.py`
runs the calls and prints what it saw). The two-host flows are in `test_hosts.py`.

On both databases: the SDK's calls touch nearly every row the control plane keeps.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.e2e.stack import run_sdk_script
from tests.integration.upstream_venv import upstream_venv

if TYPE_CHECKING:
    from tests.e2e.stack import Stack

pytestmark = [pytest.mark.vm, pytest.mark.sdk, pytest.mark.timeout(1200)]

SCRIPT = Path(__file__).with_name("wrenn_script.py")


def test_wrenn_sdk_end_to_end(stack: Stack) -> None:
    python = upstream_venv("wrenn", "0.3.0", ignore_requires_python=True)
    cp = stack.cp
    try:
        proc = run_sdk_script(python, SCRIPT, cp, key=cp.admin_key)
        assert proc.returncode == 0, f"{proc.stderr[-6000:]}\n--- cp ---\n{cp.log_tail()}"
        seen = json.loads(proc.stdout.strip().splitlines()[-1])
        print(proc.stderr)  # the steps' timings
    finally:
        r = stack.api.delete("/v1/snapshots/e2e-snap")
        assert r.status_code in (204, 404), r.text

    assert seen["created"] == {"status": "running", "template": "minimal", "aware": True}
    # the platform template it came from is made on the host at first use: its size is the
    # one the host's create answer gave
    listed = stack.api.get("/v1/snapshots")
    assert listed.status_code == 200, listed.text
    assert {t["name"]: t["size_bytes"] for t in listed.json()}["minimal"] > 0
    assert seen["run"] == {"stdout": "hello\n", "stderr": "oops\n", "exit_code": 0}
    assert seen["exit7"] == 7
    assert seen["envs_cwd"] == "hi from /tmp\n"
    assert seen["stream_types"][0] == "start"
    assert seen["stream_types"][-1] == "exit"
    assert seen["stream_types"].count("stdout") >= 2, "output must arrive as it is produced"
    assert seen["stream_stdout"] == "line1\nline2\nline3\n"
    assert seen["stream_exit"] == 0
    assert seen["bg_listed"] is True
    assert seen["bg_after_kill"] is False
    assert seen["read_text"] == "hi there"
    assert seen["binary_roundtrip"] is True
    assert seen["download_stream"] is True
    assert seen["upload_stream_size"] == str(16 * 65536)
    assert seen["make_dir"] == {"name": "e", "type": "directory"}
    assert seen["make_dir_again"] == "e"
    assert seen["list_root_has"] == ["blob.bin", "d", "hello.txt"]
    assert seen["exists"] == [True, False]
    assert seen["exists_after_remove"] is False
    assert seen["read_missing"] == "not_found"
    assert seen["pty_echo"] is True
    assert seen["pty_tag"] is True
    assert seen["pty_size"] is True
    assert seen["paused_status"] == "paused"
    assert seen["exec_while_paused"] == "conflict"
    assert seen["resumed_status"] == "running"
    assert seen["file_survived"] == "persisted\n"
    assert seen["process_survived"] is True
    assert seen["listed"] is True
    assert seen["info_status"] == "running"
    assert seen["template"] == {"name": "e2e-snap", "type": "snapshot"}
    assert seen["after_snapshot_status"] == "paused"
    first, second = (int(x) for x in seen["clone_ticks"])
    assert second > first, "the process started before the snapshot runs on in the clone"
    assert seen["clone_ticker_listed"] is True
    assert seen["clone_has_file"] == "persisted\n"
    assert seen["after_destroy"] == "not_found"
    assert seen["listed_after_destroy"] is False
