"""A backstop for a test that outlives its own timeout: dump every thread's stack, then end
the session with a failure instead of letting CI wait for hours.

pytest-timeout's signal method raises in the main thread when a test runs past its timeout;
when that happens inside an asyncio callback the event loop catches it, and a loop that then
waits for ever (e.g. pytest-asyncio's runner closing on a task that never finishes) keeps the
session open with no output: run 52 of the clean-clone loop hung that way for 20 minutes in
a module's teardown, after a test had failed. Here a timer per test (twice its timeout plus
`SLACK_S`) dumps the stacks and exits with status 3; the tier's own clean-up in `make test`
still runs.
"""

from __future__ import annotations

import faulthandler
import os
import sys
import threading
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from collections.abc import Iterator

SLACK_S = float(os.environ.get("NESTBOX_TEST_HANG_SLACK_S", "120"))
EXIT_STATUS = 3


def _timeout_s(item: pytest.Item) -> float:
    marker = item.get_closest_marker("timeout")
    if marker is not None and marker.args:
        return float(marker.args[0])
    return float(item.config.getini("timeout") or 0)


def _give_up(config: pytest.Config, nodeid: str, after_s: float) -> None:
    capture = config.pluginmanager.getplugin("capturemanager")
    if capture is not None:  # the session's real stderr again, not a test's capture file
        capture.suspend_global_capture(in_=True)
    sys.stderr.write(f"\n\nhang_guard: {nodeid} still running after {after_s:.0f} s "
                     f"(past its timeout); every thread's stack:\n")  # fmt: skip
    faulthandler.dump_traceback(all_threads=True)
    sys.stderr.flush()
    os._exit(EXIT_STATUS)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item) -> Iterator[None]:
    timeout = _timeout_s(item)
    if timeout <= 0:
        yield
        return
    after = 2 * timeout + SLACK_S
    timer = threading.Timer(after, _give_up, (item.config, item.nodeid, after))
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
