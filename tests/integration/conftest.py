"""Integration-tier fixtures: a real envd process on localhost."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.envd_process import EnvdProcess, run_envd


@pytest.fixture
def envd(tmp_path: Path) -> Iterator[EnvdProcess]:
    """A fresh envd (outside-VM mode) for one test."""
    with run_envd(tmp_path) as proc:
        yield proc
