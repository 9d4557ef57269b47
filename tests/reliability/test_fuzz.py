"""The short form of `make fuzz` (tests/reliability/fuzz.py): a fixed seed, one example per
operation, the fuzzing and stateful phases, both callers; the same pass rule as the long run."""

from __future__ import annotations

import anyio.to_thread
import pytest

from tests.reliability.fuzz import fuzz

SEED = 20261202


@pytest.mark.timeout(600)  # ~70 s alone; a loaded 2-core machine can triple it
async def test_short_fuzz_run_finds_nothing() -> None:
    passed, summary = await anyio.to_thread.run_sync(
        lambda: fuzz(seed=SEED, examples=1, phases="examples,fuzzing,stateful", max_time=None)
    )
    print(summary)
    assert passed, summary
