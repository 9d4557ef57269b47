"""The placement seam: given what a new capsule needs and the hosts that could take it, pick one.

A `Placement` is pure: it sees plain figures (`Candidate`, built by the capsule service from the
hosts' last heartbeats and the capsules the database already placed on them) and either names a
host or raises `HostUnavailable` (503 `host_unavailable`) when none can take the capsule.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from collections.abc import Sequence


@dataclass(frozen=True, slots=True)
class Demand:
    """What one new capsule needs."""

    vcpus: int
    memory_mb: int
    disk_mb: int


@dataclass(frozen=True, slots=True)
class Candidate:
    """One online host, as its last heartbeat and the database describe it."""

    host_id: str
    cpu_cores: int
    memory_total_mb: int
    memory_available_mb: int
    """Free memory the host reported (other programs' use included)."""
    disk_total_mb: int
    disk_free_mb: int
    cpu_used_pct: float
    committed_vcpus: int
    """Sums over the capsules the database placed there that hold resources (running,
    starting, …): newer than any heartbeat, so two quick creates see each other."""
    committed_memory_mb: int
    capsules: int


class Placement(Protocol):
    def choose(self, demand: Demand, candidates: Sequence[Candidate]) -> Candidate:
        """The host for a capsule needing `demand`.

        :raise HostUnavailable: no candidate, or none with room for it.
        """
        ...
