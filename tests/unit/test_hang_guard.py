"""`tests/hang_guard.py`: a test that swallows its own timeout (as an event loop catching
pytest-timeout's exception did) ends its session with status 3 and every thread's stack,
instead of hanging it."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import TYPE_CHECKING

from tests.conftest import ROOT
from tests.hang_guard import EXIT_STATUS

if TYPE_CHECKING:
    from pathlib import Path

HANGS = """
import time
import pytest

@pytest.mark.timeout(1)
def test_swallows_its_timeout():
    while True:
        try:
            time.sleep(10)
        except BaseException:
            pass
"""


def test_a_test_past_twice_its_timeout_ends_the_session(tmp_path: Path) -> None:
    (tmp_path / "test_hangs.py").write_text(HANGS)
    env = {**os.environ, "NESTBOX_TEST_HANG_SLACK_S": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "tests.hang_guard", "-p", "no:cacheprovider",
         "--rootdir", str(tmp_path), "-c", os.devnull, str(tmp_path / "test_hangs.py")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == EXIT_STATUS, done.stdout + done.stderr
    assert "hang_guard: " in done.stderr
    assert "test_hangs.py::test_swallows_its_timeout still running after 3 s" in done.stderr
    assert "in test_swallows_its_timeout" in done.stderr  # the stacks
