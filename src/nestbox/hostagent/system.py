"""The one door for privileged commands: `ip`, `iptables`, `tc`, `sysctl`.

Everything the agent does to the host's network goes through a `System`. `RealSystem` runs
argument lists (never a shell) and checks return codes; tests use `tests/fakes/system.py`
`FakeSystem`, which records the commands instead. Deliberately not here: deciding *what* to run
(that is `network/`) and QEMU processes (that is `vmm/`).
"""

from __future__ import annotations

import logging
import subprocess
from typing import Protocol

import anyio

log = logging.getLogger(__name__)

#: How much of a failing command's stderr an error keeps (the end is where the reason is).
STDERR_TAIL_CHARS = 2000


class SystemCommandError(Exception):
    """A privileged command exited non-zero (or could not be started at all)."""

    def __init__(self, argv: tuple[str, ...], returncode: int, stderr_tail: str) -> None:
        self.argv = argv
        self.returncode = returncode
        self.stderr_tail = stderr_tail
        super().__init__(f"{' '.join(argv)!r} exited {returncode}: {stderr_tail.strip()}")


def in_netns(netns: str | None, argv: tuple[str, ...]) -> tuple[str, ...]:
    """`argv` as run inside network namespace `netns` (or unchanged for the root namespace)."""
    return argv if netns is None else ("ip", "netns", "exec", netns, *argv)


class System(Protocol):
    """Runs privileged commands. Implementations provide `run`; the helpers build argv for it.

    Implementations subclass this Protocol explicitly so they inherit the helpers, and every
    command of every helper goes through their `run` (which is what fakes record).
    """

    async def run(self, *argv: str, check: bool = True, input: bytes | None = None) -> str:
        """Run `argv`; return its stdout.

        :raise SystemCommandError: it exited non-zero and `check` is true.
        """
        ...

    async def ip(self, *args: str, netns: str | None = None, check: bool = True) -> str:
        """`ip [-n NETNS] ARGS...`"""
        prefix = ("ip",) if netns is None else ("ip", "-n", netns)
        return await self.run(*prefix, *args, check=check)

    async def tc(self, *args: str, netns: str | None = None, check: bool = True) -> str:
        """`tc [-n NETNS] ARGS...`"""
        prefix = ("tc",) if netns is None else ("tc", "-n", netns)
        return await self.run(*prefix, *args, check=check)

    async def iptables(self, netns: str | None, *args: str, check: bool = True) -> str:
        """`iptables -w ARGS...`, inside `netns` if given. `-w` waits for the xtables lock,
        which every namespace shares (it is a file); the caller's deadline bounds the wait."""
        return await self.run(*in_netns(netns, ("iptables", "-w", *args)), check=check)

    async def iptables_restore(self, netns: str | None, rules: str, *, noflush: bool) -> str:
        """Apply an `iptables-save`-format `rules` text atomically, in one process.

        `noflush=False` replaces whole tables (for a fresh namespace); `noflush=True` only adds
        and deletes the rules listed, leaving everyone else's rules alone (the root namespace).
        """
        argv = ("iptables-restore", "-w", *(("--noflush",) if noflush else ()))
        return await self.run(*in_netns(netns, argv), input=rules.encode())

    async def sysctl(self, netns: str | None, key: str, value: str, *, check: bool = True) -> str:
        """Set `key=value` with `sysctl -w`, inside `netns` if given."""
        argv = in_netns(netns, ("sysctl", "-q", "-w", f"{key}={value}"))
        return await self.run(*argv, check=check)

    async def sysctl_read(self, netns: str | None, key: str, *, check: bool = True) -> str:
        """The value of `key` (`sysctl -n`, stripped), inside `netns` if given; "" when it
        does not exist and `check` is false."""
        out = await self.run(*in_netns(netns, ("sysctl", "-n", key)), check=check)
        return out.strip()


class RealSystem(System):
    """Runs commands as subprocesses of the agent (which is root).

    A command that has started is run to completion, shielded from cancellation and bounded by
    `command_timeout` instead: the caller then always knows whether the command happened, so
    it can register the matching undo before the cancellation is delivered at its next await.
    Killing `ip` half-way would leave us guessing what exists.
    """

    def __init__(self, command_timeout: float = 30.0) -> None:
        self.command_timeout = command_timeout

    async def run(self, *argv: str, check: bool = True, input: bytes | None = None) -> str:
        log.debug("system: %s", " ".join(argv))
        deadline = anyio.current_time() + self.command_timeout
        with anyio.CancelScope(shield=True, deadline=deadline) as scope:
            try:
                proc = await anyio.run_process(
                    list(argv),
                    input=input,
                    stdin=None if input else subprocess.DEVNULL,
                    check=False,
                )
            except OSError as err:
                raise SystemCommandError(argv, -1, str(err)) from err
        if scope.cancelled_caught:
            raise SystemCommandError(argv, -1, f"timed out after {self.command_timeout:g} s")
        if check and proc.returncode != 0:
            tail = proc.stderr.decode(errors="replace")[-STDERR_TAIL_CHARS:]
            raise SystemCommandError(argv, proc.returncode, tail)
        return proc.stdout.decode(errors="replace")
