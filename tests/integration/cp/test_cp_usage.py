"""Usage, stats and metrics through the public API against fake agents.

Usage is exact to the minute over a run, a pause and a resume across a (faked) UTC midnight,
with the capsule still running at the end: the clock that stamps status changes
(`db/capsules.utcnow`, whose `last_updated` the run intervals take) and the usage service's
"now" are both the test's."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from nestbox.controlplane.db import capsules as capsule_rows
from nestbox.controlplane.settings import CPSettings
from tests.integration.cp.cluster import cluster


class Clock:
    def __init__(self, start: datetime) -> None:
        self.now = start

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> None:
        self.now += timedelta(**delta)


@pytest.mark.postgres
async def test_usage_across_midnight_is_exact(
    settings: CPSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = Clock(datetime(2026, 3, 1, 22, 30, tzinfo=UTC))
    monkeypatch.setattr(capsule_rows, "utcnow", clock)
    async with cluster(settings.model_copy(update={"reconcile_interval_s": 3600})) as c:
        c.services.usage.clock = clock
        _ann, key = await c.user("ann@example.com")
        _, other = await c.user("bob@example.com")
        doc = await c.create(key)
        cid, vcpus, mem = doc["id"], doc["vcpus"], doc["memory_mb"]
        await c.create(other)  # another team's capsule counts for that team only

        async def usage(**query: str) -> dict[str, list[float]]:
            r = await c.client.get("/v1/capsules/usage", params=query, headers=key)
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["from"] == query.get("from", body["from"])
            return {p["date"]: [p["cpu_minutes"], p["ram_mb_minutes"]] for p in body["points"]}

        clock.advance(minutes=40)  # 23:10
        assert (await c.client.post(f"/v1/capsules/{cid}/pause", headers=key)).is_success
        clock.advance(minutes=40)  # 23:50, paused all along
        assert (await c.client.post(f"/v1/capsules/{cid}/resume", headers=key)).is_success
        clock.advance(minutes=30)  # 00:20 the next day, still running
        got = await usage(**{"from": "2026-03-01", "to": "2026-03-02"})
        assert got == {"2026-03-01": [50 * vcpus, 50 * mem], "2026-03-02": [20 * vcpus, 20 * mem]}

        assert (await c.client.post(f"/v1/capsules/{cid}/pause", headers=key)).is_success
        clock.advance(hours=5)
        got = await usage(**{"from": "2026-02-28", "to": "2026-03-03"})
        assert got == {"2026-02-28": [0, 0], "2026-03-01": [50 * vcpus, 50 * mem],
                       "2026-03-02": [20 * vcpus, 20 * mem], "2026-03-03": [0, 0]}  # fmt: skip
        # Defaults: the 30 days up to today (the clock's).
        got = await usage()
        assert len(got) == 30
        assert got["2026-03-02"] == [20 * vcpus, 20 * mem]

        for bad in ({"from": "2026-03-02", "to": "2026-03-01"}, {"from": "yesterday"},
                    {"from": "2025-01-01", "to": "2026-03-01"}):  # fmt: skip
            r = await c.client.get("/v1/capsules/usage", params=bad, headers=key)
            assert r.status_code == 400, bad
            assert r.json()["error"]["code"] == "invalid_request"


async def test_stats(settings: CPSettings) -> None:
    async with cluster(settings.model_copy(update={"reconcile_interval_s": 3600})) as c:
        _, key = await c.user("ann@example.com")
        _, other = await c.user("bob@example.com")
        docs = [await c.create(key) for _ in range(2)]
        await c.create(other)
        await c.services.stats.sample()
        r = await c.client.post(f"/v1/capsules/{docs[0]['id']}/pause", headers=key)
        assert r.is_success
        r = await c.client.get("/v1/capsules/stats", params={"range": "5m"}, headers=key)
        assert r.status_code == 200, r.text
        stats = r.json()
        assert stats["range"] == "5m"
        one = docs[1]
        assert stats["current"] == {"running_count": 1, "vcpus_reserved": one["vcpus"],
                                    "memory_mb_reserved": one["memory_mb"]}  # fmt: skip
        assert stats["peaks"] == {"running_count": 2, "vcpus": 2 * one["vcpus"],
                                  "memory_mb": 2 * one["memory_mb"]}  # fmt: skip
        series = stats["series"]
        assert len(series["labels"]) == len(series["running"]) == len(series["memory_mb"])
        assert max(series["running"]) == 2
        assert all(datetime.fromisoformat(x).tzinfo is not None for x in series["labels"])
        for range_ in ("1h", "6h", "24h", "30d"):
            r = await c.client.get("/v1/capsules/stats", params={"range": range_}, headers=key)
            assert r.status_code == 200, r.text
            assert r.json()["range"] == range_
        r = await c.client.get("/v1/capsules/stats", params={"range": "2d"}, headers=key)
        assert r.status_code == 400


async def test_metrics_of_a_running_and_a_paused_capsule(settings: CPSettings) -> None:
    async with cluster(settings) as c:
        _, key = await c.user("ann@example.com")
        cid = (await c.create(key))["id"]
        for verb in ("pause", "resume"):
            r = await c.client.get(f"/v1/capsules/{cid}/metrics", params={"range": "2h"},
                                   headers=key)  # fmt: skip
            assert r.status_code == 200, r.text
            assert r.json() == {"sandbox_id": cid, "range": "2h", "points": []}
            assert (await c.client.post(f"/v1/capsules/{cid}/{verb}", headers=key)).is_success
        r = await c.client.get(f"/v1/capsules/{cid}/metrics", params={"range": "3h"}, headers=key)
        assert r.status_code == 400
