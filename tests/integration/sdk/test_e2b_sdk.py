"""E2B's own `e2b` SDK from PyPI, unmodified, drives our envd (debug mode: localhost:49983)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.integration.envd_process import run_envd
from tests.integration.upstream_venv import upstream_venv

pytestmark = pytest.mark.sdk

SCRIPT = Path(__file__).with_name("e2b_script.py")


def test_e2b_sdk_against_our_envd(tmp_path: Path) -> None:
    python = upstream_venv("e2b", "2.63.0")
    work = tmp_path / "files"
    work.mkdir()
    (work / "existing.txt").write_text("x")
    with run_envd(tmp_path, port=49983):
        proc = subprocess.run(
            [str(python), str(SCRIPT)],
            env={**os.environ, "E2B_DEBUG": "true", "E2B_TEST_DIR": str(work)},
            capture_output=True,
            text=True,
            timeout=90,
        )
    assert proc.returncode == 0, proc.stderr
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen["run"] == {"stdout": "hello-from-e2b\n", "stderr": "oops\n", "exit_code": 0}
    # Each line was printed only after the previous one had arrived: one chunk per line.
    assert seen["stream_chunks"] == ["line1\n", "line2\n", "line3\n"]
    assert seen["read"] == "written by e2b"
    assert seen["list"] == ["existing.txt", "hello.txt"]
    assert seen["bg_listed"] is True
    assert seen["killed"] is True
    assert seen["bg_after_kill"] is False
