"""RealSystem with harmless commands (no root needed): stdout, errors, timeouts."""

from __future__ import annotations

import pytest

from nestbox.hostagent.system import RealSystem, SystemCommandError, in_netns


async def test_real_system_returns_stdout_and_raises_with_stderr_tail() -> None:
    system = RealSystem()
    assert await system.run("echo", "hi") == "hi\n"
    assert await system.run("cat", input=b"abc") == "abc"
    assert await system.run("false", check=False) == ""
    with pytest.raises(SystemCommandError) as info:
        await system.run("sh", "-c", "echo out; echo why >&2; exit 3")
    assert (info.value.argv[0], info.value.returncode) == ("sh", 3)
    assert info.value.stderr_tail == "why\n"
    with pytest.raises(SystemCommandError) as info:
        await system.run("/nonexistent/nestbox-binary")
    assert info.value.returncode == -1


async def test_real_system_command_timeout() -> None:
    with pytest.raises(SystemCommandError, match="timed out"):
        await RealSystem(command_timeout=0.2).run("sleep", "5")


def test_in_netns() -> None:
    assert in_netns(None, ("sysctl", "x")) == ("sysctl", "x")
    assert in_netns("ns1", ("sysctl", "x")) == ("ip", "netns", "exec", "ns1", "sysctl", "x")
