"""The slot bands of test sessions (tests/integration/vm/slot_band.py): two sessions at once get
different bands, a band comes free when its session ends however it ends, and only the last
session standing may remove the shared blackhole routes."""

from __future__ import annotations

import subprocess
import sys
from typing import TYPE_CHECKING

import pytest

from tests.integration.vm import slot_band

if TYPE_CHECKING:
    from pathlib import Path

CHILD = """
import sys
from pathlib import Path
from tests.integration.vm import slot_band
slot_band.LOCK_DIR = Path(sys.argv[1])
print(slot_band.claim_slot_first(), flush=True)
sys.stdin.read()  # holds the band until the parent closes our stdin
"""


@pytest.fixture
def bands(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.delenv("NESTBOX_TEST_SLOT_FIRST", raising=False)
    monkeypatch.setattr(slot_band, "LOCK_DIR", tmp_path / "locks")
    monkeypatch.setattr(slot_band, "_claimed", None)
    return tmp_path / "locks"


def other_session(lock_dir: Path) -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(lock_dir)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    return proc, int(proc.stdout.readline())


def test_two_sessions_get_two_bands_and_an_ended_one_frees_its_own(bands: Path) -> None:
    first = slot_band.claim_slot_first()
    assert first == 1
    assert slot_band.claim_slot_first() == first  # the same band on every call
    proc, theirs = other_session(bands)
    try:
        assert theirs == 1001
        assert not slot_band.sole_session()
    finally:
        proc.kill()  # a session that dies without cleaning up still frees its band
        proc.communicate()
    assert slot_band.sole_session()
    proc, again = other_session(bands)
    proc.communicate()  # ends when its stdin closes
    assert again == 1001


def test_the_bands_skip_the_benchmarks_and_fit_the_veth_range() -> None:
    assert 3001 not in slot_band.BANDS
    assert 4001 not in slot_band.BANDS
    assert 4 * (max(slot_band.BANDS) + 399) + 3 < 2**16


def test_an_explicit_first_slot_takes_no_lock(bands: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NESTBOX_TEST_SLOT_FIRST", "7001")
    assert slot_band.claim_slot_first() == 7001
    assert not bands.exists()
