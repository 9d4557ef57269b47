"""envd runs above the guest's programs, so a keystroke, a process start or a file call is
served at once while the user's programs keep the capsule's vCPU busy (under TCG a download
through the port proxy alone keeps it ~95% busy, and every keystroke's echo waited behind it).

Linux keeps a nice value per thread, and a new thread or child starts with its parent thread's:
envd raises its own at start-up, before it makes any thread, and puts every program it starts
(processes, port forwarders) back to the value envd itself started with. Only in a VM: envd on
a developer's machine leaves the machine's scheduling alone.
"""

from __future__ import annotations

import contextlib
import os

ENVD_NICE = -5
"""envd's nice value in a capsule: ~3x the CPU share of a program at 0 when both want it."""

_programs_nice: int | None = None
"""The nice value programs get (envd's own before it raised it); None: envd did not raise."""


def raise_envd() -> bool:
    """Raise the calling thread (envd's main thread, before any other exists) to `ENVD_NICE`;
    False if that is not allowed (not root)."""
    global _programs_nice
    before = os.getpriority(os.PRIO_PROCESS, 0)
    try:
        os.setpriority(os.PRIO_PROCESS, 0, ENVD_NICE)
    except PermissionError:
        return False
    _programs_nice = before
    return True


def as_program(pid: int) -> None:
    """Put a process envd just started back to the programs' nice value (a process that
    already ended needs nothing)."""
    if _programs_nice is None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.setpriority(os.PRIO_PROCESS, pid, _programs_nice)
