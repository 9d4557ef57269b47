"""Running the build's external commands (apt, dpkg, debootstrap, mkfs, pip, ...).

Argument lists only, never a shell. Each command runs in its own process group so that a
cancelled build stops it and its children (SIGTERM first: debootstrap unmounts what it mounted
in its exit trap; SIGKILL after a grace period).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
from pathlib import Path
from subprocess import DEVNULL, PIPE
from typing import TYPE_CHECKING

import anyio

from nestbox.hostagent.image.errors import ImageBuildError

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from anyio.abc import ByteReceiveStream, Process

log = logging.getLogger(__name__)

TAIL_LINES = 25
STOP_GRACE_S = 10.0


async def run(
    argv: Sequence[str | Path],
    *,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    capture: bool = False,
) -> bytes:
    """Run `argv` and return its stdout (only if `capture`, else b"").

    :raise ImageBuildError: the command could not start or exited non-zero.
    """
    command = [str(a) for a in argv]
    log.debug("running %s", command)
    try:
        proc = await anyio.open_process(
            command,
            stdin=DEVNULL,
            stdout=PIPE,
            stderr=PIPE,
            cwd=cwd,
            env=env,
            start_new_session=True,
        )
    except OSError as err:
        raise ImageBuildError(f"cannot run {command[0]}: {err}", command=command) from err
    stdout, stderr = bytearray(), bytearray()
    try:
        async with anyio.create_task_group() as tg:
            assert proc.stdout is not None
            assert proc.stderr is not None
            tg.start_soon(_drain, proc.stdout, stdout, capture)
            tg.start_soon(_drain, proc.stderr, stderr, False)
        returncode = await proc.wait()
    finally:
        with anyio.CancelScope(shield=True):
            await _stop(proc)
    if returncode != 0:
        tail = _tail(stderr) or _tail(stdout)
        raise ImageBuildError(
            f"{Path(command[0]).name} exited with status {returncode}: {_short(command)}",
            command=command,
            returncode=returncode,
            output_tail=tail,
        )
    return bytes(stdout) if capture else b""


def require_tools(*names: str) -> None:
    """:raise ImageBuildError: one of the executables is not on PATH."""
    missing = [n for n in names if shutil.which(n) is None]
    if missing:
        raise ImageBuildError(
            f"missing tools: {', '.join(missing)} (run 'make system-deps' as root)"
        )


async def _drain(stream: ByteReceiveStream, into: bytearray, keep_all: bool) -> None:
    limit = 64 * 1024  # only the tail matters for error messages
    async for chunk in stream:
        into += chunk
        if not keep_all and len(into) > 2 * limit:
            del into[:-limit]


async def _stop(proc: Process) -> None:
    """Stop the command's process group if it still runs, then release its pipes."""
    if proc.returncode is None:
        _signal_group(proc.pid, signal.SIGTERM)
        with anyio.move_on_after(STOP_GRACE_S):
            await proc.wait()
        if proc.returncode is None:
            _signal_group(proc.pid, signal.SIGKILL)
            await proc.wait()
    await proc.aclose()


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)


def _tail(data: bytearray) -> str:
    lines = data.decode(errors="replace").strip().splitlines()
    return "\n".join(lines[-TAIL_LINES:])


def _short(command: list[str]) -> str:
    text = " ".join(command)
    return text if len(text) <= 200 else text[:197] + "..."
