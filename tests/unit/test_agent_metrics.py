"""The agent's per-capsule metrics history (`hostagent/metrics.py`): raw samples for 10 minutes,
30 s and 5 min averages for 2 h and 24 h, bounded whatever the capsule's age, each range
answered from the finest tier that covers it (the filling bucket included)."""

from __future__ import annotations

import time

import pytest

from nestbox.hostagent.metrics import MetricPoint, MetricsRing


def point(ts_s: float, cpu: float = 10.0, mem: int = 1000) -> MetricPoint:
    return MetricPoint(ts_unix_ms=int(ts_s * 1000), cpu_pct=cpu, mem_bytes=mem, disk_bytes=7)


def test_tiers_downsample_and_stay_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    now = 1_800_000_000.0  # a multiple of 300 s: buckets line up with the samples
    monkeypatch.setattr(time, "time", lambda: now)
    ring = MetricsRing()
    day = 86_400
    for i in range(2 * day):  # two days of 1 s samples; cpu alternates 0 and 20
        ring.add(point(now - 2 * day + i, cpu=20.0 * (i % 2), mem=1000 + i % 2))

    raw = ring.since(300)
    assert [p.ts_unix_ms // 1000 for p in raw] == [now - 300 + i for i in range(300)]
    assert ring.since(0) == ring.since(None)
    assert len(ring.since(None)) == 600

    half_hour = ring.since(1800)  # from the 30 s tier
    assert [p.ts_unix_ms // 1000 for p in half_hour] == [now - 1800 + 30 * i for i in range(60)]
    assert {p.ts_unix_ms % 30_000 for p in half_hour} == {0}
    assert {p.cpu_pct for p in half_hour} == {10.0}
    assert {p.mem_bytes for p in half_hour} == {1000}

    whole = ring.since(day)  # from the 5 min tier, bounded at 288 points
    assert [p.ts_unix_ms // 1000 for p in whole] == [now - day + 300 * i for i in range(288)]
    assert {p.ts_unix_ms % 300_000 for p in whole} == {0}
    assert {p.cpu_pct for p in whole} == {10.0}
    assert len(ring.since(2 * 3600)) == 240


def test_a_young_capsule_shows_its_partial_bucket(monkeypatch: pytest.MonkeyPatch) -> None:
    now = 1_800_000_007.0
    monkeypatch.setattr(time, "time", lambda: now)
    ring = MetricsRing()
    ring.add(point(now - 2, cpu=30.0))
    ring.add(point(now - 1, cpu=10.0))
    for range_s in (3600, 86_400):
        [only] = ring.since(range_s)
        assert only.cpu_pct == 20.0
    assert [p.cpu_pct for p in ring.since(600)] == [30.0, 10.0]
