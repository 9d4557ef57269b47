"""Exit statuses and signals for process groups and sessions.

Every process envd starts leads its own session and process group (`start_new_session=True`), so
its pid is also its process-group id and session id. Signals go to the whole group; at shutdown
envd also sweeps the session, which catches the job-control groups an interactive shell made.
"""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path

from nestbox.envd.process.fanout import EndInfo

log = logging.getLogger(__name__)

PROC = Path("/proc")


def describe_exit(returncode: int) -> EndInfo:
    """The end event for a `Popen.returncode`, worded as Go's `ProcessState.String()`:
    "exit status 3" (exited, code 3) or "signal: killed" (not exited, code -1)."""
    if returncode >= 0:
        return EndInfo(exit_code=returncode, exited=True, status=f"exit status {returncode}")
    sig = -returncode
    try:
        name = (signal.strsignal(sig) or f"signal {sig}").lower()
    except ValueError:
        name = f"signal {sig}"
    return EndInfo(exit_code=-1, exited=False, status=f"signal: {name}")


def signal_group(pgid: int, sig: int) -> bool:
    """Send `sig` to process group `pgid`; False if the group no longer exists."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return False
    return True


def session_members(sid: int) -> list[int]:
    """Pids of the processes whose session id is `sid` (by `/proc/<pid>/stat`).

    Blocking file reads: call it from a worker thread.
    """
    members = []
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # Fields after the parenthesised command: state ppid pgrp session ...
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) > 3 and int(fields[3]) == sid:
            members.append(int(entry.name))
    return members


def kill_session(sid: int) -> int:
    """SIGKILL the process group `sid` and every other process still in session `sid`.

    Returns how many processes or groups were signalled. Blocking: run in a worker thread.
    """
    killed = int(signal_group(sid, signal.SIGKILL))
    for pid in session_members(sid):
        try:
            os.kill(pid, signal.SIGKILL)
            killed += 1
        except (ProcessLookupError, PermissionError):
            continue
    return killed
