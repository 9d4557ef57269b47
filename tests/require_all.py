"""`NESTBOX_REQUIRE_ALL=1` (CI: `.ci/run`): every skip is a failure.

A missing tool, privilege or kernel feature must not turn a tier green by not running it. Every
kind of skip goes through these hooks, whatever raised it: `pytest.skip`, a `skip`/`skipif`
mark, `pytest.importorskip`, a fixture that skips (a session fixture's skip fails every test
using it), a module skipped while it is collected, unittest's `SkipTest`. `xfail` is not a skip
and is left alone. Without the variable (or with it empty or `0`) skips stay skips; the reasons
that are legitimate on other machines are listed in CONTRIBUTING.md.

`tests/conftest.py` registers the hooks; a pytest run outside this tree can load them with
`-p tests.require_all` (the unit test of this module does).
"""

from __future__ import annotations

import os
from collections.abc import Generator

import pytest

REQUIRE_ALL = "NESTBOX_REQUIRE_ALL"


def require_all() -> bool:
    return os.environ.get(REQUIRE_ALL, "") not in ("", "0")


def refusal(reason: str) -> str:
    return f"skipped, but {REQUIRE_ALL}=1 makes every skip a failure: {reason}"


def _skip_to_failure() -> Generator[None, object, object]:
    """The body of the phase wrappers: a skip leaving the phase becomes a failure carrying the
    skip's reason (reported FAILED for the test body, ERROR for setup and teardown)."""
    try:
        return (yield)
    except pytest.skip.Exception as skip:
        if not require_all():
            raise
        raise pytest.fail.Exception(refusal(skip.msg or "no reason given"), pytrace=False) from None


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Generator[None, object, object]:
    # `skip`/`skipif` marks are evaluated here, and fixtures are set up here.
    return (yield from _skip_to_failure())


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, object, object]:
    return (yield from _skip_to_failure())


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item) -> Generator[None, object, object]:
    return (yield from _skip_to_failure())


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """The net under the wrappers: whatever else reports a skip (unittest's SkipTest, another
    plugin) fails too."""
    report = yield
    if require_all() and report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = refusal(_skip_reason(report.longrepr))
    return report


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(
    collector: pytest.Collector,
) -> Generator[None, pytest.CollectReport, pytest.CollectReport]:
    """A module skipped while it is collected (`pytest.skip(allow_module_level=True)`,
    `pytest.importorskip` at module level) is a collection error."""
    report = yield
    if require_all() and report.skipped:
        report.outcome = "failed"
        report.longrepr = refusal(_skip_reason(report.longrepr))
    return report


def _skip_reason(longrepr: object) -> str:
    """A skip report's `longrepr` is (path, line, "Skipped: reason")."""
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        path, line, reason = longrepr
        return f"{str(reason).removeprefix('Skipped: ')} ({path}:{line})"
    return str(longrepr)
