"""Shared fixtures and helpers for every tier, and the `NESTBOX_REQUIRE_ALL` rule.

With `NESTBOX_REQUIRE_ALL=1` (CI: `.ci/run`) a test that skips fails instead, whatever raised
the skip: the hooks are in `tests/require_all.py`, registered here. The skip reasons that stay
legitimate on other machines are listed in CONTRIBUTING.md.

Waiting in tests: on a condition (`wait_until`, `eventually`), with a generous bound for a
hang, never a fixed sleep that a busy machine outlasts.
"""

from __future__ import annotations

import socket
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import anyio
import pytest

# A test still running at twice its timeout ends the session (stacks dumped), never hangs it.
from tests.hang_guard import pytest_runtest_protocol  # noqa: F401

# The VM session fixtures, registered here so that the VM tier and the end-to-end tier
# (tests/e2e) share one `minimal` template per session (see that module).
from tests.integration.vm.session import guest_image, minimal_template, vm_settings  # noqa: F401

# Every skip fails under NESTBOX_REQUIRE_ALL=1: hooks found by name on this module.
from tests.require_all import (  # noqa: F401
    pytest_make_collect_report,
    pytest_runtest_call,
    pytest_runtest_makereport,
    pytest_runtest_setup,
    pytest_runtest_teardown,
)

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
HANG_S = 60.0
"""The bound for a hang where a test waits on something that takes milliseconds when the
machine is quiet: CI runs the host tier beside the VM tier on two cores (10 s was met once)."""

T = TypeVar("T")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


# ---- waiting on conditions, never on the clock ----------------------------------------------


def wait_until(
    condition: Callable[[], T | None], *, within: float = 30.0, every: float = 0.05, what: str = ""
) -> T:
    """Poll `condition` until it returns something truthy, and return that; fail the test after
    `within` seconds (a bound for a hang, generous: a busy machine only makes it wait longer)."""
    deadline = time.monotonic() + within
    while not (value := condition()):
        if time.monotonic() > deadline:
            pytest.fail(f"not within {within} s: {what or condition}")
        time.sleep(every)
    return value


async def eventually(
    condition: Callable[[], T | Awaitable[T | None] | None],
    *,
    within: float = 30.0,
    every: float = 0.02,
    what: str = "",
) -> T:
    """`wait_until` for async tests: `condition` may be a plain or an async callable."""
    deadline = time.monotonic() + within
    while True:
        value = condition()
        if isinstance(value, Awaitable):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"not within {within} s: {what or condition}")
        await anyio.sleep(every)
