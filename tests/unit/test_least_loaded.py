"""Least-loaded placement: pure figures in, one host (or `HostUnavailable`) out."""

from __future__ import annotations

import pytest

from nestbox.controlplane.errors import HostUnavailable
from nestbox.controlplane.scheduling import Candidate, Demand, LeastLoaded
from nestbox.controlplane.scheduling.least_loaded import memory_free_mb, score

DEMAND = Demand(vcpus=1, memory_mb=512, disk_mb=5120)


def host(host_id: str, **kw: float) -> Candidate:
    figures: dict[str, float] = {
        "cpu_cores": 8, "memory_total_mb": 32768, "memory_available_mb": 30000,
        "disk_total_mb": 500 * 1024, "disk_free_mb": 400 * 1024, "cpu_used_pct": 5.0,
        "committed_vcpus": 0, "committed_memory_mb": 0, "capsules": 0,
    }  # fmt: skip
    figures.update(kw)
    return Candidate(host_id=host_id, **{k: type(v)(v) for k, v in figures.items()})  # type: ignore[arg-type]


def test_the_emptier_host_wins() -> None:
    chosen = LeastLoaded().choose(
        DEMAND, [host("a", committed_memory_mb=16000, capsules=30), host("b")]
    )
    assert chosen.host_id == "b"


def test_the_tightest_resource_decides() -> None:
    # b has more memory free but its CPU is nearly saturated
    a = host("a", committed_memory_mb=8000)
    b = host("b", cpu_used_pct=97.0)
    assert LeastLoaded().choose(DEMAND, [a, b]).host_id == "a"


def test_reported_free_memory_is_a_limit_too() -> None:
    # nothing placed, but the machine itself has little free (other programs)
    starved = host("a", memory_available_mb=1500)
    assert memory_free_mb(starved)[0] == 1500 - 1024
    assert score(starved, Demand(1, 600, 10)) is None
    assert score(starved, Demand(1, 400, 10)) is not None


def test_admission() -> None:
    with pytest.raises(HostUnavailable, match="no host is online"):
        LeastLoaded().choose(DEMAND, [])
    full = host("a", committed_memory_mb=24100)  # capacity 32768 - 8192 reserve = 24576
    low_disk = host("b", disk_free_mb=30 * 1024 + 100)
    with pytest.raises(HostUnavailable, match="no host has room"):
        LeastLoaded().choose(DEMAND, [full, low_disk])


def test_ties_are_deterministic() -> None:
    assert LeastLoaded().choose(DEMAND, [host("b"), host("a")]).host_id == "a"
    assert LeastLoaded().choose(DEMAND, [host("a", capsules=2), host("b")]).host_id == "b"


def test_small_hosts_keep_a_proportional_reserve() -> None:
    small = host("s", memory_total_mb=4096, memory_available_mb=3500, disk_total_mb=20 * 1024,
                 disk_free_mb=15 * 1024, cpu_cores=2)  # fmt: skip
    assert score(small, DEMAND) is not None  # 8 GiB / 30 GiB reserves would refuse everything
