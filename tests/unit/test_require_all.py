"""`NESTBOX_REQUIRE_ALL=1` turns every skip into a failure (tests/require_all.py); without it
a skip stays a skip. Checked on a tiny generated suite run by a pytest subprocess with the hooks
loaded as a plugin: one test per way a test can skip, plus a pass and an xfail."""

from __future__ import annotations

import os
import re
import subprocess
import textwrap
from typing import TYPE_CHECKING

import pytest

from tests.conftest import PYTHON, ROOT
from tests.require_all import REQUIRE_ALL, require_all

if TYPE_CHECKING:
    from pathlib import Path

SUITE = """
import pytest

@pytest.fixture(scope="session")
def tool():
    pytest.skip("reason-fixture: the tool is not installed")

def test_passes():
    pass

def test_skip_call():
    pytest.skip("reason-call: needs root")

@pytest.mark.skipif(True, reason="reason-mark: no socat")
def test_skip_mark():
    pass

def test_skip_fixture(tool):
    pass

def test_importorskip():
    pytest.importorskip("nestbox_no_such_module_xyz", reason="reason-import")

@pytest.mark.xfail(reason="a known bug", strict=True)
def test_xfail():
    assert False
"""

MODULE_SKIP = """
import pytest

pytest.importorskip("nestbox_no_such_module_xyz", reason="reason-module")

def test_never_collected():
    pass
"""


def run_suite(tmp_path: Path, *, require_all: bool) -> tuple[int, str]:
    suite = tmp_path / "suite"
    suite.mkdir(exist_ok=True)
    (suite / "test_tiny.py").write_text(textwrap.dedent(SUITE))
    (suite / "test_module_skip.py").write_text(textwrap.dedent(MODULE_SKIP))
    # Not the project's settings (no filterwarnings=error, no timeout, no -ra).
    (suite / "pytest.ini").write_text("[pytest]\nasyncio_default_fixture_loop_scope = function\n")
    env = {k: v for k, v in os.environ.items() if k != REQUIRE_ALL}
    if require_all:
        env[REQUIRE_ALL] = "1"
    done = subprocess.run(
        [PYTHON, "-m", "pytest", "-p", "no:cacheprovider", "-p", "tests.require_all", "-rA",
         "--continue-on-collection-errors", "-c", str(suite / "pytest.ini"),
         "--rootdir", str(suite), str(suite)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.stderr == "", done.stderr
    return done.returncode, done.stdout


def summary(out: str) -> dict[str, int]:
    """The counts of pytest's last line: {"passed": 1, "failed": 3, ...}."""
    last = out.strip().splitlines()[-1]
    return {word: int(n) for n, word in re.findall(r"(\d+) (\w+)", last)}


def test_without_the_variable_skips_stay_skips(tmp_path: Path) -> None:
    code, out = run_suite(tmp_path, require_all=False)
    assert code == 0, out
    assert summary(out) == {"passed": 1, "skipped": 5, "xfailed": 1}, out


def test_with_the_variable_every_skip_fails_with_its_reason(tmp_path: Path) -> None:
    code, out = run_suite(tmp_path, require_all=True)
    assert code == 1, out
    # Skips in the test body fail; skips at setup (marks, fixtures) are errors; the module
    # skipped while it was collected is a collection error. The pass and the xfail are as they
    # were.
    assert summary(out) == {"failed": 2, "passed": 1, "xfailed": 1, "errors": 3}, out
    refusal = f"skipped, but {REQUIRE_ALL}=1 makes every skip a failure: "
    refusals = [line for line in out.splitlines() if line.startswith(refusal)]
    for reason in ("reason-call", "reason-mark", "reason-fixture", "reason-import",
                   "reason-module"):  # fmt: skip
        assert sum(reason in line for line in refusals) == 1, (reason, out)
    assert "SKIPPED" not in out, out


@pytest.mark.parametrize("value", ["", "0"])
def test_empty_or_zero_means_off(value: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(REQUIRE_ALL, value)
    assert not require_all()
    monkeypatch.setenv(REQUIRE_ALL, "1")
    assert require_all()


def test_the_project_conftest_registers_every_hook(pytestconfig: pytest.Config) -> None:
    import tests.require_all as rule

    hooks = pytestconfig.pluginmanager.hook
    for name in ("pytest_runtest_setup", "pytest_runtest_call", "pytest_runtest_teardown",
                 "pytest_runtest_makereport", "pytest_make_collect_report"):  # fmt: skip
        impls = getattr(hooks, name).get_hookimpls()
        assert any(impl.function is getattr(rule, name) for impl in impls), name
