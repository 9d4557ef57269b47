"""`FakeTargets`: a `CapsuleTargets` over a dict of capsule id -> address, one `ConnTracker`
per capsule, as the manager will keep them."""

from __future__ import annotations

from nestbox.hostagent.proxytrack import (
    CapsuleTargets,
    ConnTracker,
    Lease,
    TargetNotFound,
    TargetUnavailable,
)


class FakeTargets(CapsuleTargets):
    def __init__(self, addresses: dict[str, str] | None = None) -> None:
        self.addresses = dict(addresses or {})
        self.paused: set[str] = set()
        self.trackers: dict[str, ConnTracker] = {}

    def tracker(self, capsule_id: str) -> ConnTracker:
        return self.trackers.setdefault(capsule_id, ConnTracker())

    def acquire(self, capsule_id: str) -> Lease:
        address = self.addresses.get(capsule_id)
        if address is None:
            raise TargetNotFound(capsule_id)
        if capsule_id in self.paused:
            raise TargetUnavailable("paused")
        tracker = self.tracker(capsule_id)
        tracker.acquire()
        return Lease(address, tracker.release)
