"""Least-loaded placement (Wrenn's `least_loaded`, the scheduler it runs): score each host by
the fraction it has free of memory, CPU and disk, take the smallest of the three as its score,
and place on the host with the best score. Memory and disk are admission rules (a capsule that
does not fit is refused); CPU is overcommitted and only steers.

Numbers, per host:
- memory: capacity = total - reserve (min(8 GiB, a quarter of it), for the host itself and
  the agent); free = the smaller of capacity minus what placed capsules were given, and what
  the host reports free minus a live reserve (min(1 GiB, a sixteenth)).
- CPU: capacity = cores x 2 vCPUs; free fraction = the smaller of 1 - vCPUs given / capacity
  and 1 - the CPU use the host reported.
- disk: free = reported free - reserve (min(30 GiB, a tenth of the disk)); capacity = total -
  reserve. A capsule's disk is a copy-on-write overlay, so only the host's real free space
  counts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from nestbox.controlplane.errors import HostUnavailable

if TYPE_CHECKING:
    from collections.abc import Sequence

    from nestbox.controlplane.scheduling.base import Candidate, Demand

MEMORY_RESERVE_MB = 8192
LIVE_MEMORY_RESERVE_MB = 1024
DISK_RESERVE_MB = 30 * 1024
CPU_OVERCOMMIT = 2.0


def memory_free_mb(c: Candidate) -> tuple[int, int]:
    """(free, capacity) memory of `c` in MiB."""
    capacity = c.memory_total_mb - min(MEMORY_RESERVE_MB, c.memory_total_mb // 4)
    live = c.memory_available_mb - min(LIVE_MEMORY_RESERVE_MB, c.memory_total_mb // 16)
    return min(capacity - c.committed_memory_mb, live), max(capacity, 1)


def disk_free_mb(c: Candidate) -> tuple[int, int]:
    reserve = min(DISK_RESERVE_MB, c.disk_total_mb // 10)
    return c.disk_free_mb - reserve, max(c.disk_total_mb - reserve, 1)


def cpu_free_fraction(c: Candidate) -> float:
    capacity = max(c.cpu_cores, 1) * CPU_OVERCOMMIT
    return max(0.0, min(1 - c.committed_vcpus / capacity, 1 - c.cpu_used_pct / 100))


def score(c: Candidate, demand: Demand) -> float | None:
    """The fraction `c` would have free after taking `demand` (its tightest resource), or
    None if memory or disk does not fit."""
    mem_free, mem_capacity = memory_free_mb(c)
    disk_free, disk_capacity = disk_free_mb(c)
    if mem_free < demand.memory_mb or disk_free < demand.disk_mb:
        return None
    cpu = cpu_free_fraction(c)
    return min((mem_free - demand.memory_mb) / mem_capacity,
               (disk_free - demand.disk_mb) / disk_capacity, cpu)  # fmt: skip


class LeastLoaded:
    """The `Placement` of the control plane: the best score wins; ties go to the host with
    fewer capsules, then to the smaller id (deterministic)."""

    def choose(self, demand: Demand, candidates: Sequence[Candidate]) -> Candidate:
        if not candidates:
            raise HostUnavailable("no host is online to take the capsule")
        scored = [(s, c) for c in candidates if (s := score(c, demand)) is not None]
        if not scored:
            raise HostUnavailable(
                f"no host has room for {demand.memory_mb} MiB of memory and "
                f"{demand.disk_mb} MiB of disk"
            )
        best = max(scored, key=lambda sc: (sc[0], -sc[1].capsules, _neg(sc[1].host_id)))
        return best[1]


def _neg(host_id: str) -> tuple[int, ...]:
    """Sorts host ids in reverse, so `max` prefers the smaller one on a tie."""
    return tuple(-ord(ch) for ch in host_id)
