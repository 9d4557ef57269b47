"""envd's priority over the programs it starts (`envd/priority.py`), in a process of its own:
raising changes the calling thread, and what it starts afterwards inherits that."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from nestbox.envd import priority

SCRIPT = r"""
import os, subprocess, sys, threading
from nestbox.envd import priority

nice = lambda pid=0: os.getpriority(os.PRIO_PROCESS, pid)
untouched = subprocess.Popen(["sleep", "30"])
priority.as_program(untouched.pid)  # nothing raised yet: nothing to do
print(nice(untouched.pid), priority.raise_envd(), nice())
seen = []
thread = threading.Thread(target=lambda: seen.append(nice()))  # made after: envd's value
thread.start(); thread.join()
child = subprocess.Popen(["sleep", "30"])
inherited = nice(child.pid)
priority.as_program(child.pid)
print(seen[0], inherited, nice(child.pid))
for p in (untouched, child):
    p.kill(); p.wait()
gone = subprocess.Popen(["true"]); gone.wait()
priority.as_program(gone.pid)  # already reaped: no error
print("ok")
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="raising a nice value needs root")
def test_envd_is_raised_and_its_programs_are_not() -> None:
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                         timeout=60, check=True).stdout.split("\n")  # fmt: skip
    assert out[0].split() == ["0", "True", "-5"]
    assert out[1].split() == ["-5", "-5", "0"]
    assert out[2] == "ok"


def test_without_permission_nothing_changes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Not root: envd runs on at its nice value, and leaves its programs alone."""

    def refused(*_: object) -> None:
        raise PermissionError("not allowed")

    monkeypatch.setattr(priority, "_programs_nice", None)
    monkeypatch.setattr(priority.os, "setpriority", refused)
    assert priority.raise_envd() is False
    priority.as_program(os.getpid())  # nothing raised: nothing set (it would raise here)
